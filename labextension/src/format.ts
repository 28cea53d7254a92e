/** Text for the numbers the API gives: "–" for anything missing. */
import { RunNodes } from './api';

export const DASH = '–';

function missing(value: unknown): boolean {
  return (
    value === null ||
    value === undefined ||
    (typeof value === 'number' && !isFinite(value))
  );
}

export function money(value: number | null | undefined): string {
  if (missing(value)) {
    return DASH;
  }
  const v = value as number;
  return `$${v < 10 ? v.toFixed(2) : v.toFixed(1)}`;
}

/** 75 -> "1:15", 4000 -> "1:06:40". */
export function clock(seconds: number | null | undefined): string {
  if (missing(seconds)) {
    return DASH;
  }
  const s = Math.max(0, Math.round(seconds as number));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}

/** 4.2 -> "4.2s", 95 -> "1m 35s", 7300 -> "2h 01m". */
export function duration(seconds: number | null | undefined): string {
  if (missing(seconds)) {
    return DASH;
  }
  const s = Math.max(0, seconds as number);
  if (s < 10) {
    return `${s.toFixed(1)}s`;
  }
  if (s < 60) {
    return `${Math.round(s)}s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m ${String(Math.round(s % 60)).padStart(2, '0')}s`;
  }
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

export function percent(value: number | null | undefined): string {
  return missing(value) ? DASH : `${Math.round(value as number)}%`;
}

export function bytes(value: number | null | undefined): string {
  if (missing(value)) {
    return DASH;
  }
  let v = value as number;
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i++;
  }
  return `${v < 10 && i > 0 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

/** A number on an axis or in a tooltip: 4 significant digits. */
export function num(value: number | null | undefined): string {
  if (missing(value)) {
    return DASH;
  }
  const v = value as number;
  if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < 1e-3)) {
    return v.toExponential(2);
  }
  return String(Number(v.toPrecision(4)));
}

/** A run's nodes as the list gives them: a count, names or records. */
export function runNodes(nodes: RunNodes): string {
  if (missing(nodes)) {
    return DASH;
  }
  if (typeof nodes === 'number') {
    return `${nodes} node${nodes === 1 ? '' : 's'}`;
  }
  if (Array.isArray(nodes)) {
    if (nodes.length === 0) {
      return DASH;
    }
    return nodes
      .map(n => (typeof n === 'string' ? n : (n?.node ?? '?')))
      .join(', ');
  }
  return String(nodes);
}

/** The line "Insert attach" puts in a cell; quotes a name with spaces. */
export function attachLine(name: string): string {
  const arg = /^[\w.:@+-]+$/.test(name) ? name : JSON.stringify(name);
  return `%lepton attach ${arg}`;
}
