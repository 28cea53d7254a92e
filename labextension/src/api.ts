/**
 * The REST API of lepton_magic's Jupyter Server extension (lepton_magic/server),
 * under `{baseUrl}lepton/api/`: types and one request helper.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export type RunStatus =
  'queued' | 'starting' | 'running' | 'succeeded' | 'failed' | 'cancelled';

/** Statuses of a run that has not ended: only these can be cancelled. */
export const ACTIVE_STATUSES: ReadonlyArray<string> = [
  'queued',
  'starting',
  'running'
];

export interface IPoolNode {
  node: string;
  host: string;
  /** Where the backend put it, in its own terms (a Ray node and the GPUs Ray assigned). */
  place?: string | null;
  status: string;
  gpus: number;
  gpu_name: string | null;
  cpu_percent: number | null;
  mem_used: number | null;
  last_seen_ago: number | null;
}

export interface IPool {
  id: string;
  backend: string;
  status: 'up' | 'down';
  nodes_ready: number;
  nodes_total: number;
  gpus: number;
  cost_per_hour: number | null;
  cost_so_far: number | null;
  idle_timeout: number | null;
  idle_remaining: number | null;
  owner_pid: number | null;
  nodes: IPoolNode[];
}

/** A run's nodes in the list: a count, node names or node records. */
export type RunNodes = number | Array<string | IRunNode> | null | undefined;

export interface IRunNode {
  node: string;
  host: string;
  ranks: number[];
  gpus: number;
  gpu_name: string | null;
  status: string;
}

export interface IRun {
  id: string;
  name: string | null;
  status: RunStatus | string;
  backend: string;
  world_size: number | null;
  nodes: RunNodes;
  created: string | number | null;
  started: string | number | null;
  ended: string | number | null;
  duration: number | null;
  last_step: number | null;
  sparkline: Array<number | null>;
  metric: string | null;
  owner_pid: number | null;
  error: string | null;
  /** A sweep (%%lepton --sweep): its trials by status, objective and best trial so far. */
  sweep?: ISweep | null;
}

export interface ISweep {
  trials: number | null;
  counts: Record<string, number>;
  objective: string | null;
  direction: string | null;
  best: { trial: number; params: Record<string, unknown>; objective: number } | null;
}

/** metric -> rank -> [[step, value], ...] */
export type Curves = Record<string, Record<string, Array<[number, number]>>>;

export interface IRunDetail extends IRun {
  nodes: IRunNode[];
  curves: Curves;
  logs: Record<string, string[]>;
}

/** An HTTP error of the API, with the server's `message` when it gave one. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string
  ) {
    super(message);
  }
}

/**
 * Call the API. Resolves to the parsed JSON body; rejects with an `ApiError`
 * for an HTTP error status, with `ServerConnection.NetworkError` when the
 * server cannot be reached.
 */
export async function requestAPI<T>(
  endPoint: string,
  init: RequestInit = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'lepton', 'api', endPoint);
  const response = await ServerConnection.makeRequest(url, init, settings);
  const text = await response.text();
  let data: any = null;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const message =
      (data && typeof data.message === 'string' && data.message) ||
      response.statusText ||
      `HTTP ${response.status}`;
    throw new ApiError(response.status, message);
  }
  return data as T;
}

export const api = {
  pools: () => requestAPI<{ pools: IPool[] }>('pools'),
  runs: (limit = 50) => requestAPI<{ runs: IRun[] }>(`runs?limit=${limit}`),
  run: (id: string) => requestAPI<IRunDetail>(`runs/${encodeURIComponent(id)}`),
  cancelRun: (id: string) =>
    requestAPI<unknown>(`runs/${encodeURIComponent(id)}/cancel`, {
      method: 'POST'
    }),
  releasePool: (id: string) =>
    requestAPI<unknown>(`pools/${encodeURIComponent(id)}/release`, {
      method: 'POST'
    }),
  releaseNode: (pool: string, node: string) =>
    requestAPI<unknown>(
      `pools/${encodeURIComponent(pool)}/nodes/${encodeURIComponent(node)}/release`,
      { method: 'POST' }
    )
};
