/**
 * What the sidebar shows, fetched from the server extension. The sidebar keeps
 * nothing of its own: every tick replaces the pools, the runs and the open
 * run's detail with what the store holds now.
 */
import { ServerConnection } from '@jupyterlab/services';
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { api, ApiError, IPool, IRun, IRunDetail } from './api';

/** Why the panel cannot show live data right now. */
export interface IProblem {
  /** `missing`: no server extension (404); `failing`: any other error. */
  kind: 'missing' | 'failing';
  message: string;
}

export class LeptonModel {
  pools: IPool[] = [];
  runs: IRun[] = [];
  /** The run whose detail is open, and its detail once fetched. */
  selectedId: string | null = null;
  detail: IRunDetail | null = null;
  /** `performance.now()` when `pools` was fetched: countdowns tick from it. */
  fetchedAt = 0;
  /** True once a first answer (data or error) came back. */
  loaded = false;
  problem: IProblem | null = null;
  /** The last failed action, shown until the next action. */
  actionError: string | null = null;
  /** Keys of actions in flight (their buttons are disabled). */
  readonly busy = new Set<string>();

  constructor(options: LeptonModel.IOptions = {}) {
    this._poll = new Poll({
      name: 'lepton-magic:sidebar',
      auto: false,
      factory: () => this._fetch(),
      frequency: { interval: 1000, backoff: true, max: 30 * 1000 },
      standby: options.standby ?? 'when-hidden'
    });
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get isDisposed(): boolean {
    return this._poll.isDisposed;
  }

  /** Start polling (the first tick runs at once). */
  start(): void {
    void this._poll.start();
  }

  /** Fetch now rather than at the next tick. */
  refresh(): Promise<void> {
    return this._poll.refresh();
  }

  select(id: string | null): void {
    if (id === this.selectedId) {
      return;
    }
    this.selectedId = id;
    this.detail = null;
    this._changed.emit();
    if (id !== null) {
      void this.refresh();
    }
  }

  cancelRun(id: string): Promise<void> {
    return this._act(`cancel:${id}`, 'Cancel', () => api.cancelRun(id));
  }

  releasePool(id: string): Promise<void> {
    return this._act(`pool:${id}`, 'Release pool', () => api.releasePool(id));
  }

  releaseNode(pool: string, node: string): Promise<void> {
    return this._act(`node:${pool}/${node}`, 'Release', () =>
      api.releaseNode(pool, node)
    );
  }

  dispose(): void {
    this._poll.dispose();
    Signal.clearData(this);
  }

  private async _act(
    key: string,
    label: string,
    call: () => Promise<unknown>
  ): Promise<void> {
    this.busy.add(key);
    this.actionError = null;
    this._changed.emit();
    try {
      await call();
    } catch (error) {
      this.actionError = `${label} failed: ${describe(error)}`;
    } finally {
      this.busy.delete(key);
      this._changed.emit();
    }
    await this.refresh();
  }

  /** One tick: everything the panel shows, in parallel. */
  private async _fetch(): Promise<void> {
    const selected = this.selectedId;
    try {
      const [pools, runs, detail] = await Promise.all([
        api.pools(),
        api.runs(50),
        selected === null
          ? Promise.resolve(null)
          : api.run(selected).catch(error => {
              // A run deleted from the store closes its detail; other errors fail the tick.
              if (error instanceof ApiError && error.status === 404) {
                return null;
              }
              throw error;
            })
      ]);
      this.pools = pools?.pools ?? [];
      this.runs = runs?.runs ?? [];
      this.fetchedAt = performance.now();
      if (this.selectedId === selected) {
        this.detail = detail;
        if (selected !== null && detail === null) {
          this.selectedId = null;
        }
      }
      this.problem = null;
    } catch (error) {
      this.problem = problemOf(error);
      throw error; // the poll backs off
    } finally {
      this.loaded = true;
      this._changed.emit();
    }
  }

  private _poll: Poll;
  private _changed = new Signal<this, void>(this);
}

export namespace LeptonModel {
  export interface IOptions {
    /** When the poll stands by; defaults to 'when-hidden'. */
    standby?: Poll.Standby | (() => boolean | Poll.Standby);
  }
}

function describe(error: unknown): string {
  if (error instanceof ApiError) {
    return `${error.message} (HTTP ${error.status})`;
  }
  if (error instanceof ServerConnection.NetworkError) {
    return 'the Jupyter server cannot be reached';
  }
  return error instanceof Error ? error.message : String(error);
}

function problemOf(error: unknown): IProblem {
  if (error instanceof ApiError && error.status === 404) {
    return {
      kind: 'missing',
      message:
        'This Jupyter server does not answer lepton/api/, so the sidebar has ' +
        'nothing to show. Install lepton-magic in the environment that runs ' +
        'Jupyter and restart it: `jupyter server extension list` should list ' +
        'lepton_magic as enabled.'
    };
  }
  if (error instanceof ServerConnection.NetworkError) {
    return {
      kind: 'failing',
      message: 'The Jupyter server cannot be reached. Retrying…'
    };
  }
  return {
    kind: 'failing',
    message: `The lepton_magic server extension failed: ${describe(error)}. Retrying…`
  };
}
