/** The sidebar: pools with their nodes, runs, and the open run's detail. */
import { INotebookTracker } from '@jupyterlab/notebook';
import { ReactWidget } from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import React, { useEffect, useLayoutEffect, useRef, useState } from 'react';

import {
  ACTIVE_STATUSES,
  IPool,
  IPoolNode,
  IRun,
  IRunDetail,
  ISweep
} from './api';
import { RankChart, rankColour, Sparkline } from './charts';
import {
  attachLine,
  bytes,
  clock,
  DASH,
  duration,
  money,
  num,
  percent,
  runNodes
} from './format';
import { LeptonModel } from './model';

/** Where "Insert attach" writes: the active cell of the current notebook. */
export class AttachTarget {
  constructor(private readonly _tracker: INotebookTracker | null) {}

  /** The notebook that would receive the line, or null when none is open. */
  get notebookName(): string | null {
    const panel = this._tracker?.currentWidget;
    return panel && panel.content.activeCell ? panel.title.label : null;
  }

  /** Put `line` in the active cell: the whole cell if empty, else a new last line. */
  insert(line: string): boolean {
    const panel = this._tracker?.currentWidget;
    const cell = panel?.content.activeCell;
    if (!panel || !cell) {
      return false;
    }
    const shared = cell.model.sharedModel;
    const source = shared.getSource();
    if (source.trim() === '') {
      shared.setSource(line);
    } else {
      shared.setSource(
        source.endsWith('\n') ? source + line : `${source}\n${line}`
      );
    }
    return true;
  }
}

export class LeptonSidebar extends ReactWidget {
  constructor(
    readonly model: LeptonModel,
    private readonly _tracker: INotebookTracker | null,
    private readonly _activate: (panelId: string) => void = () => undefined
  ) {
    super();
    this.id = 'lepton-sidebar';
    this.addClass('lepton-sidebar');
    this.title.caption = 'Lepton';
    this._target = new AttachTarget(_tracker);
    model.changed.connect(this._onChange, this);
    _tracker?.currentChanged.connect(this._onChange, this);
    _tracker?.activeCellChanged.connect(this._onChange, this);
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this.model.dispose();
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    void this.model.refresh();
  }

  protected render(): JSX.Element {
    return (
      <SidebarView
        model={this.model}
        notebookName={this._target.notebookName}
        onInsert={ref => this._insert(ref)}
      />
    );
  }

  private _insert(ref: string): void {
    const panel = this._tracker?.currentWidget;
    if (this._target.insert(attachLine(ref)) && panel) {
      this._activate(panel.id);
      panel.content.activeCell?.editor?.focus();
    }
  }

  private _onChange(): void {
    this.update();
  }

  private _target: AttachTarget;
}

function SidebarView(props: {
  model: LeptonModel;
  notebookName: string | null;
  onInsert: (ref: string) => void;
}): JSX.Element {
  const { model } = props;
  const problem = model.problem;
  // `%lepton attach` takes a name or an id: the id when another listed run has the same name
  const named = new Map<string, number>();
  for (const run of model.runs) {
    if (run.name) {
      named.set(run.name, (named.get(run.name) ?? 0) + 1);
    }
  }
  return (
    <div className={`lepton-sidebar-content ${problem ? 'lepton-stale' : ''}`}>
      <header className="lepton-header">
        <h2>Lepton</h2>
        <span
          className={`lepton-live ${problem ? 'lepton-live-off' : ''}`}
          title={problem ? 'not updating' : 'updating every second'}
        >
          {!model.loaded ? 'connecting…' : problem ? 'offline' : 'live'}
        </span>
        <button
          className="lepton-button lepton-refresh"
          title="Refresh now"
          onClick={() => void model.refresh()}
        >
          Refresh
        </button>
      </header>
      {problem && (
        <div
          className={`lepton-message lepton-message-${problem.kind}`}
          role="status"
        >
          {problem.kind === 'missing' && (
            <strong>Lepton server extension missing. </strong>
          )}
          {problem.message}
        </div>
      )}
      {model.actionError && (
        <div className="lepton-message lepton-message-action" role="alert">
          {model.actionError}
        </div>
      )}
      <section className="lepton-section lepton-pools">
        <h3>
          Pools <span className="lepton-count">{model.pools.length}</span>
        </h3>
        {model.loaded && !problem && model.pools.length === 0 && (
          <div className="lepton-empty">
            No pool is up. <code>%lepton up --nodes 2</code> starts one.
          </div>
        )}
        {model.pools.map(pool => (
          <PoolView key={pool.id} pool={pool} model={model} />
        ))}
      </section>
      <section className="lepton-section lepton-runs">
        <h3>
          Runs <span className="lepton-count">{model.runs.length}</span>
        </h3>
        {model.loaded && !problem && model.runs.length === 0 && (
          <div className="lepton-empty">
            No run yet. Put <code>%%lepton --nodes 2</code> on top of a cell.
          </div>
        )}
        {model.runs.map(run => (
          <React.Fragment key={run.id}>
            <RunRow
              run={run}
              model={model}
              selected={run.id === model.selectedId}
              notebookName={props.notebookName}
              attachRef={
                run.name && named.get(run.name) === 1 ? run.name : run.id
              }
              onInsert={props.onInsert}
            />
            {run.id === model.selectedId && (
              <RunDetailView run={run} detail={model.detail} />
            )}
          </React.Fragment>
        ))}
      </section>
    </div>
  );
}

/** Seconds left, ticking down locally from the last fetch. */
function Countdown(props: {
  seconds: number | null;
  fetchedAt: number;
}): JSX.Element {
  const [, setTick] = useState(0);
  useEffect(() => {
    if (props.seconds === null) {
      return;
    }
    const timer = window.setInterval(() => setTick(t => t + 1), 1000);
    return () => window.clearInterval(timer);
  }, [props.seconds, props.fetchedAt]);
  if (props.seconds === null || props.seconds === undefined) {
    return <span className="lepton-idle-countdown">{DASH}</span>;
  }
  const left = props.seconds - (performance.now() - props.fetchedAt) / 1000;
  return (
    <span
      className={`lepton-idle-countdown ${left < 60 ? 'lepton-idle-soon' : ''}`}
    >
      {clock(left)}
    </span>
  );
}

function PoolView(props: { pool: IPool; model: LeptonModel }): JSX.Element {
  const { pool, model } = props;
  const busy = model.busy.has(`pool:${pool.id}`);
  return (
    <div className="lepton-pool" data-pool-id={pool.id}>
      <div className="lepton-pool-head">
        <span className="lepton-pool-backend">{pool.backend}</span>
        <span
          className="lepton-pool-id"
          title={`pool ${pool.id}, pid ${pool.owner_pid ?? DASH}`}
        >
          {pool.id}
        </span>
        <button
          className="lepton-button lepton-danger lepton-pool-release"
          disabled={busy}
          title="Release every node of this pool (cloud instances are terminated)"
          onClick={() => void model.releasePool(pool.id)}
        >
          {busy ? 'Releasing…' : 'Release pool'}
        </button>
      </div>
      <div className="lepton-pool-stats">
        <span title="nodes ready / total">
          <label>nodes</label>
          {pool.nodes_ready}/{pool.nodes_total}
        </span>
        <span title="GPUs in the pool">
          <label>GPUs</label>
          {pool.gpus ?? 0}
        </span>
        <span className="lepton-pool-rate" title="cost per hour">
          <label>$/h</label>
          {money(pool.cost_per_hour)}
        </span>
        <span className="lepton-pool-cost" title="cost so far">
          <label>cost</label>
          {money(pool.cost_so_far)}
        </span>
        <span
          className="lepton-pool-idle"
          title={
            pool.idle_timeout === null || pool.idle_timeout === undefined
              ? 'no idle shutdown'
              : pool.idle_remaining === null ||
                  pool.idle_remaining === undefined
                ? `busy: released after ${clock(pool.idle_timeout)} without a run`
                : `released after ${clock(pool.idle_timeout)} without a run`
          }
        >
          <label>idle shutdown</label>
          <Countdown
            seconds={pool.idle_remaining}
            fetchedAt={model.fetchedAt}
          />
        </span>
      </div>
      <div className="lepton-nodes">
        {(pool.nodes ?? []).map(node => (
          <NodeView key={node.node} pool={pool} node={node} model={model} />
        ))}
      </div>
    </div>
  );
}

function NodeView(props: {
  pool: IPool;
  node: IPoolNode;
  model: LeptonModel;
}): JSX.Element {
  const { pool, node, model } = props;
  const busy = model.busy.has(`node:${pool.id}/${node.node}`);
  const gpu = node.gpus
    ? `${node.gpus}× ${node.gpu_name ?? 'GPU'}`
    : 'CPU only';
  return (
    <div className="lepton-node" data-node={node.node}>
      <div className="lepton-node-line">
        <span className="lepton-node-name">{node.node}</span>
        <span className="lepton-node-host" title={node.place ?? undefined}>
          {node.host}
          {node.place ? ` · ${node.place}` : ''}
        </span>
        <span
          className={`lepton-badge lepton-node-status lepton-status-${node.status}`}
        >
          {node.status}
        </span>
        <button
          className="lepton-button lepton-node-release"
          disabled={busy}
          title={`Release ${node.node}`}
          onClick={() => void model.releaseNode(pool.id, node.node)}
        >
          {busy ? '…' : 'Release'}
        </button>
      </div>
      <div className="lepton-node-line lepton-dim">
        <span>{gpu}</span>
        <span>CPU {percent(node.cpu_percent)}</span>
        <span>mem {bytes(node.mem_used)}</span>
        <span>
          seen{' '}
          {node.last_seen_ago === null
            ? DASH
            : `${duration(node.last_seen_ago)} ago`}
        </span>
      </div>
    </div>
  );
}

function RunRow(props: {
  run: IRun;
  model: LeptonModel;
  selected: boolean;
  notebookName: string | null;
  attachRef: string;
  onInsert: (ref: string) => void;
}): JSX.Element {
  const { run, model, selected, notebookName, attachRef } = props;
  const name = run.name || run.id;
  const active = ACTIVE_STATUSES.includes(run.status);
  const cancelling = model.busy.has(`cancel:${run.id}`);
  const toggle = () => model.select(selected ? null : run.id);
  const stop = (e: React.SyntheticEvent) => e.stopPropagation();
  return (
    <div
      className={`lepton-run-row ${selected ? 'lepton-selected' : ''}`}
      data-run-id={run.id}
      data-run-name={name}
      role="button"
      tabIndex={0}
      aria-expanded={selected}
      title="Show the run's curves, nodes and logs"
      onClick={toggle}
      onKeyDown={e => {
        if (
          e.target === e.currentTarget &&
          (e.key === 'Enter' || e.key === ' ')
        ) {
          e.preventDefault();
          toggle();
        }
      }}
    >
      <div className="lepton-run-line">
        <span className="lepton-run-name">{name}</span>
        <span
          className={`lepton-badge lepton-run-status lepton-status-${run.status}`}
        >
          {run.status}
        </span>
      </div>
      <div className="lepton-run-line">
        <Sparkline values={run.sparkline} metric={run.metric} />
        <span className="lepton-run-progress" title="last step logged">
          {run.last_step === null || run.last_step === undefined
            ? DASH
            : `step ${run.last_step}`}
        </span>
        <span className="lepton-run-duration" title="duration">
          {duration(run.duration)}
        </span>
      </div>
      <div className="lepton-run-line lepton-dim">
        <span className="lepton-run-nodes" title="nodes">
          {run.backend} · {runNodes(run.nodes)}
          {run.world_size
            ? ` · ${run.world_size} rank${run.world_size === 1 ? '' : 's'}`
            : ''}
        </span>
      </div>
      {run.sweep && <SweepLine sweep={run.sweep} />}
      {run.error && (
        <div className="lepton-run-error" title={run.error}>
          {run.error}
        </div>
      )}
      <div className="lepton-run-actions" onClick={stop} onKeyDown={stop}>
        {active && (
          <button
            className="lepton-button lepton-danger lepton-run-cancel"
            disabled={cancelling}
            title={`Cancel ${name} on every node`}
            onClick={() => void model.cancelRun(run.id)}
          >
            {cancelling ? 'Cancelling…' : 'Cancel'}
          </button>
        )}
        <button
          className="lepton-button lepton-run-attach"
          disabled={notebookName === null}
          title={
            notebookName === null
              ? 'Open a notebook to insert %lepton attach'
              : `Insert "${attachLine(attachRef)}" into the active cell of ${notebookName}`
          }
          onClick={() => props.onInsert(attachRef)}
        >
          Insert attach
        </button>
      </div>
    </div>
  );
}

function RunDetailView(props: {
  run: IRun;
  detail: IRunDetail | null;
}): JSX.Element {
  const { run, detail } = props;
  const metrics = detail ? Object.keys(detail.curves ?? {}) : [];
  const preferred =
    run.metric && metrics.includes(run.metric) ? run.metric : metrics[0];
  const [chosen, setChosen] = useState<string | null>(null);
  const metric = chosen && metrics.includes(chosen) ? chosen : preferred;
  if (!detail) {
    return (
      <div className="lepton-run-detail" data-run-id={run.id}>
        <div className="lepton-empty">Loading {run.name || run.id}…</div>
      </div>
    );
  }
  const ranks = (detail.nodes ?? [])
    .flatMap(n => (n.ranks ?? []).map(rank => ({ rank, node: n })))
    .sort((a, b) => a.rank - b.rank);
  const nodeOfRank = new Map(ranks.map(r => [String(r.rank), r.node.node]));
  const logRanks = Object.keys(detail.logs ?? {}).sort(
    (a, b) => Number(a) - Number(b)
  );
  return (
    <div className="lepton-run-detail" data-run-id={run.id}>
      {metrics.length > 1 && (
        <label className="lepton-metric-choice">
          metric{' '}
          <select value={metric} onChange={e => setChosen(e.target.value)}>
            {metrics.map(m => (
              <option key={m} value={m}>
                {m}
              </option>
            ))}
          </select>
        </label>
      )}
      {metric ? (
        <RankChart lines={detail.curves[metric] ?? {}} metric={metric} />
      ) : (
        <div className="lepton-chart-empty">No metric logged yet.</div>
      )}
      <table className="lepton-rank-table">
        <thead>
          <tr>
            <th>rank</th>
            <th>node</th>
            <th>host</th>
            <th>GPU</th>
            <th>status</th>
          </tr>
        </thead>
        <tbody>
          {ranks.map(({ rank, node }) => (
            <tr key={rank} data-rank={rank}>
              <td>
                <i
                  className="lepton-rank-chip"
                  style={{ background: rankColour(rank) }}
                />
                {rank}
              </td>
              <td>{node.node}</td>
              <td>{node.host}</td>
              <td>
                {node.gpus ? `${node.gpus}× ${node.gpu_name ?? 'GPU'}` : 'CPU'}
              </td>
              <td>
                <span className={`lepton-badge lepton-status-${node.status}`}>
                  {node.status}
                </span>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <div className="lepton-logs">
        {logRanks.length === 0 && (
          <div className="lepton-empty">No log output yet.</div>
        )}
        {logRanks.map(rank => (
          <LogTail
            key={rank}
            rank={rank}
            node={nodeOfRank.get(rank) ?? null}
            lines={detail.logs[rank] ?? []}
          />
        ))}
      </div>
      {detail.error && (
        <pre className="lepton-run-error lepton-log">{detail.error}</pre>
      )}
      <div className="lepton-dim lepton-run-steps">
        last step {num(detail.last_step)}
      </div>
    </div>
  );
}

/** A rank's last log lines; stays scrolled to the bottom unless the user scrolled up. */
function LogTail(props: {
  rank: string;
  node: string | null;
  lines: string[];
}): JSX.Element {
  const ref = useRef<HTMLPreElement>(null);
  const stick = useRef(true);
  const text = props.lines.join('\n');
  useLayoutEffect(() => {
    const pre = ref.current;
    if (pre && stick.current) {
      pre.scrollTop = pre.scrollHeight;
    }
  }, [text]);
  return (
    <div className="lepton-log-rank" data-rank={props.rank}>
      <div className="lepton-log-title">
        <i
          className="lepton-rank-chip"
          style={{ background: rankColour(Number(props.rank)) }}
        />
        rank {props.rank}
        {props.node ? ` · ${props.node}` : ''}
      </div>
      <pre
        ref={ref}
        className="lepton-log"
        onScroll={e => {
          const pre = e.currentTarget;
          stick.current =
            pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        }}
      >
        {text || ' '}
      </pre>
    </div>
  );
}

/** A sweep's row: how many of its trials ended how, and the best one so far. */
function SweepLine(props: { sweep: ISweep }): JSX.Element {
  const { sweep } = props;
  const done = Object.values(sweep.counts).reduce((a, b) => a + b, 0);
  const parts = Object.entries(sweep.counts)
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([status, n]) => `${n} ${status}`)
    .join(' · ');
  const way = sweep.direction === 'maximize' ? 'max' : 'min';
  const best =
    sweep.best && typeof sweep.best.objective === 'number'
      ? ` · best: trial ${sweep.best.trial} = ${sweep.best.objective.toPrecision(4)}`
      : '';
  return (
    <div className="lepton-run-line lepton-dim lepton-sweep-line" title="sweep trials">
      sweep · {done} of {sweep.trials ?? '?'} trials
      {parts ? ` (${parts})` : ''} · {way} {sweep.objective ?? 'first metric'}
      {best}
    </div>
  );
}
