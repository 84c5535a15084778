/**
 * How a job reads: the split progress bar (the inline widget's colours),
 * tasks/s, elapsed and ETA as the widget words them, where a job came
 * from, and `el()`, the one way this extension makes DOM nodes.
 *
 * Everything shown here may come from machines we do not control (job
 * names, hosts, errors): `el()` only ever sets `textContent` and
 * attributes, never HTML.
 */
import { Counts, JobRecord, TASK_STATES, serverNow } from './api';

/** pymw_magic.widgets.jobview.STATE_COLORS, state by state. */
export const STATE_COLORS: Record<string, string> = {
  pending: '#d9d9d9',
  running: '#54a24b',
  retrying: '#f58518',
  done: '#4c78a8',
  failed: '#e45756',
  cancelled: '#9d9d9d'
};

/** A node with classes, text and attributes: text is always textContent. */
export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = '',
  text?: string | null,
  attrs: Record<string, string> = {}
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text !== undefined && text !== null) {
    node.textContent = text;
  }
  for (const [k, v] of Object.entries(attrs)) {
    node.setAttribute(k, v);
  }
  return node;
}

/** Set a node's text only when it changed: a poll rewrites hundreds of
 * rows, and an unchanged write still costs the page a layout. */
export function setText(node: HTMLElement, text: string): void {
  if (node.textContent !== text) {
    node.textContent = text;
  }
}

/** Seconds as the inline widget shows them ("3.2 s", "4:05 min", "2:10 h"). */
export function seconds(s: number | null | undefined): string {
  if (s === null || s === undefined || !isFinite(s)) {
    return '?';
  }
  if (s < 60) {
    return `${s.toFixed(1)} s`;
  }
  const whole = Math.floor(s);
  const m = Math.floor(whole / 60);
  const rest = whole % 60;
  if (m < 60) {
    return `${m}:${String(rest).padStart(2, '0')} min`;
  }
  return `${Math.floor(m / 60)}:${String(m % 60).padStart(2, '0')} h`;
}

export function finishedTasks(c: Counts): number {
  return (c.done ?? 0) + (c.failed ?? 0) + (c.cancelled ?? 0);
}

export function countsText(c: Counts): string {
  const shown = TASK_STATES.filter(s => c[s]).map(s => `${s} ${c[s]}`);
  return shown.join(', ') || 'no tasks';
}

export interface JobFigures {
  elapsed: number;
  rate: number;
  eta: number | null;
}

/** Elapsed seconds, tasks/s and seconds left, as JobSnapshot computes them
 * (the server's figures when it sent them: its clock is the store's). */
export function figures(job: JobRecord): JobFigures {
  if (typeof job.elapsed === 'number') {
    const eta = job.state !== 'active' ? 0 : typeof job.eta === 'number' ? job.eta : null;
    return { elapsed: job.elapsed, rate: job.rate ?? 0, eta };
  }
  const end = job.ended ?? (job.state === 'active' ? Math.max(serverNow(), job.updated_at) : job.updated_at);
  const elapsed = Math.max(0, end - job.created);
  const done = finishedTasks(job.counts);
  const rate = elapsed > 0 ? done / elapsed : 0;
  let eta: number | null = null;
  if (job.state !== 'active') {
    eta = 0;
  } else if (job.total !== null && rate > 0) {
    eta = Math.max(0, (job.total - done) / rate);
  }
  return { elapsed, rate, eta };
}

export function rateText(rate: number): string {
  return rate >= 10 ? Math.round(rate).toLocaleString('en-US') : rate.toFixed(rate >= 1 ? 1 : 2);
}

function basename(path: string): string {
  return path.split(/[\\/]/).filter(Boolean).pop() ?? path;
}

/** The notebook or script that started the job (its file name), else its process. */
export function origin(job: JobRecord): string {
  const o = job.owner;
  if (job.notebook) {
    return `notebook ${basename(job.notebook)}`;
  }
  if (o.script) {
    return `script ${basename(o.script)}`;
  }
  const who = o.kind === 'kernel' && o.kernel_id ? `kernel ${o.kernel_id.slice(0, 8)}` : o.kind;
  return `${who} (pid ${o.pid} on ${o.host})`;
}

/** The whole story of where a job came from (a tooltip). */
export function originDetail(job: JobRecord): string {
  const o = job.owner;
  const parts = [job.notebook ? `notebook ${job.notebook}` : '', o.script ? `script ${o.script}` : ''];
  const kernel = o.kernel_id ? ` ${o.kernel_id}` : '';
  parts.push(`${o.kind}${kernel}, pid ${o.pid} on ${o.host}`);
  return parts.filter(Boolean).join('\n');
}

/** The split bar: one segment per state; pending is the background. */
export class StateBar {
  readonly node = el('div', 'pymw-bar');
  private segs = new Map<string, HTMLDivElement>();

  constructor() {
    this.node.style.background = STATE_COLORS.pending;
    for (const state of TASK_STATES) {
      if (state === 'pending') {
        continue;
      }
      const seg = el('div', `pymw-seg pymw-seg-${state}`);
      seg.style.background = STATE_COLORS[state];
      seg.style.width = '0%';
      this.segs.set(state, seg);
      this.node.appendChild(seg);
    }
  }

  update(counts: Counts, total: number | null): void {
    const sum = TASK_STATES.reduce((n, s) => n + (counts[s] ?? 0), 0);
    const n = Math.max(total ?? 0, sum, 1);
    for (const [state, seg] of this.segs) {
      const count = counts[state as keyof Counts] ?? 0;
      const width = `${((100 * count) / n).toFixed(3)}%`;
      if (seg.dataset.width !== width) {
        seg.dataset.width = width; // (the style reads back normalized: "20%", not "20.000%")
        seg.style.width = width;
      }
      seg.style.display = count ? '' : 'none';
      seg.title = `${state} ${count}`;
    }
    this.node.title = countsText(counts);
  }
}
