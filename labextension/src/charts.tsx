/** Inline SVG charts: the sparkline of a run row and the per-rank chart of its detail. */
import React from 'react';

import { num } from './format';

/** Matplotlib's C0..C9, the colours the notebook panel gives ranks. */
export const RANK_COLOURS = [
  '#1f77b4',
  '#ff7f0e',
  '#2ca02c',
  '#d62728',
  '#9467bd',
  '#8c564b',
  '#e377c2',
  '#7f7f7f',
  '#bcbd22',
  '#17becf'
];

export function rankColour(rank: number): string {
  return RANK_COLOURS[((rank % 10) + 10) % 10];
}

type Point = [number, number];

/** Finite points only: the API's nulls (and NaN, inf) split a line. */
function segments(points: Array<[number, number | null]>): Point[][] {
  const out: Point[][] = [];
  let current: Point[] = [];
  for (const [x, y] of points) {
    if (y === null || y === undefined || !isFinite(y) || !isFinite(x)) {
      if (current.length) {
        out.push(current);
      }
      current = [];
    } else {
      current.push([x, y]);
    }
  }
  if (current.length) {
    out.push(current);
  }
  return out;
}

interface IBox {
  x0: number;
  x1: number;
  y0: number;
  y1: number;
}

function bounds(lines: Point[][]): IBox | null {
  let box: IBox | null = null;
  for (const line of lines) {
    for (const [x, y] of line) {
      if (!box) {
        box = { x0: x, x1: x, y0: y, y1: y };
      } else {
        box.x0 = Math.min(box.x0, x);
        box.x1 = Math.max(box.x1, x);
        box.y0 = Math.min(box.y0, y);
        box.y1 = Math.max(box.y1, y);
      }
    }
  }
  if (box) {
    if (box.x1 === box.x0) {
      box.x1 = box.x0 + 1;
    }
    if (box.y1 === box.y0) {
      const pad = Math.abs(box.y0) * 0.05 || 1;
      box.y0 -= pad;
      box.y1 += pad;
    }
  }
  return box;
}

/** SVG `points` for a line in a W x H box (y grows downwards). */
function toPoints(
  line: Point[],
  box: IBox,
  w: number,
  h: number,
  pad: number
): string {
  return line
    .map(([x, y]) => {
      const px = pad + ((x - box.x0) / (box.x1 - box.x0)) * (w - 2 * pad);
      const py = pad + (1 - (y - box.y0) / (box.y1 - box.y0)) * (h - 2 * pad);
      return `${px.toFixed(1)},${py.toFixed(1)}`;
    })
    .join(' ');
}

/** ≤ 40 values of rank 0's metric, nulls allowed. */
export function Sparkline(props: {
  values: Array<number | null> | null | undefined;
  metric: string | null;
}): JSX.Element {
  const W = 80;
  const H = 22;
  const values = props.values ?? [];
  const lines = segments(values.map((v, i) => [i, v]));
  const box = bounds(lines);
  const finite = values.filter(
    (v): v is number => v !== null && v !== undefined && isFinite(v)
  );
  const last = finite.length ? finite[finite.length - 1] : null;
  const title =
    last === null
      ? 'no metric yet'
      : `${props.metric ?? 'metric'} ${num(last)}`;
  return (
    <svg
      className="lepton-sparkline"
      width={W}
      height={H}
      viewBox={`0 0 ${W} ${H}`}
      role="img"
      aria-label={title}
    >
      <title>{title}</title>
      {box &&
        lines.map((line, i) => {
          const points = toPoints(line, box, W, H, 2);
          if (line.length === 1) {
            const [cx, cy] = points.split(',');
            return <circle key={i} r={1.5} cx={cx} cy={cy} />;
          }
          return <polyline key={i} points={points} />;
        })}
    </svg>
  );
}

/** One polyline per rank of one metric, with its range and a legend. */
export function RankChart(props: {
  lines: Record<string, Array<[number, number]>>;
  metric: string;
}): JSX.Element {
  const W = 300;
  const H = 140;
  const ranks = Object.keys(props.lines).sort((a, b) => Number(a) - Number(b));
  const perRank = ranks.map(rank => ({
    rank,
    lines: segments(props.lines[rank] ?? [])
  }));
  const box = bounds(perRank.flatMap(r => r.lines));
  if (!box) {
    return (
      <div className="lepton-chart-empty">No {props.metric} logged yet.</div>
    );
  }
  return (
    <div className="lepton-chart">
      <div className="lepton-chart-plot">
        <div className="lepton-chart-ymax">{num(box.y1)}</div>
        <svg
          viewBox={`0 0 ${W} ${H}`}
          preserveAspectRatio="none"
          role="img"
          aria-label={`${props.metric} by rank`}
        >
          <rect
            className="lepton-chart-frame"
            x={0}
            y={0}
            width={W}
            height={H}
          />
          {perRank.map(({ rank, lines }) =>
            lines.map((line, i) => (
              <polyline
                key={`${rank}-${i}`}
                data-rank={rank}
                points={toPoints(line, box, W, H, 3)}
                stroke={rankColour(Number(rank))}
                vectorEffect="non-scaling-stroke"
              />
            ))
          )}
        </svg>
        <div className="lepton-chart-ymin">{num(box.y0)}</div>
        <div className="lepton-chart-xaxis">
          <span>step {num(box.x0)}</span>
          <span>{props.metric}</span>
          <span>step {num(box.x1)}</span>
        </div>
      </div>
      <div className="lepton-chart-legend">
        {ranks.map(rank => (
          <span key={rank}>
            <i style={{ background: rankColour(Number(rank)) }} />
            rank {rank}
          </span>
        ))}
      </div>
    </div>
  );
}
