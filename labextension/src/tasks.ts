/**
 * The task table of one job, in the main area: a page of its recorded
 * tasks (state, host, attempts, duration, error; the traceback on demand),
 * filtered by state, paged, and refreshed while the job runs and the table
 * is shown.  Every value is set as text: hosts and errors can come from
 * machines we do not control.
 */
import { Poll } from '@lumino/polling';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { api, JobRecord, TASK_STATES, TaskRecord } from './api';
import { el, seconds, STATE_COLORS } from './format';

export const PAGE_SIZE = 50;

export class TasksView extends Widget {
  private job: JobRecord;
  private offset = 0;
  private total: number | null = null;
  private recorded: boolean | null = null;
  private state = '';
  private body = el('tbody');
  private range = el('span', 'pymw-tasks-range');
  private note = el('div', 'pymw-tasks-note');
  private prev = el('button', 'jp-mod-styled pymw-tasks-prev', 'Previous', { type: 'button' });
  private next = el('button', 'jp-mod-styled pymw-tasks-next', 'Next', { type: 'button' });
  private filter = el('select', 'pymw-tasks-filter', null, { 'aria-label': 'state' });
  private poll: Poll;

  constructor(job: JobRecord, getJob: (uid: string) => JobRecord | undefined) {
    super();
    this.job = job;
    this.addClass('pymw-tasks');
    this.id = `pymw-tasks-${job.uid}`;
    this.title.label = `Tasks: ${job.name}`;
    this.title.caption = `The tasks of job ${job.name} (${job.uid})`;
    this.title.closable = true;
    const head = el('div', 'pymw-tasks-head');
    head.append(el('span', 'pymw-tasks-title', `Job ${job.name} \u00b7 ${job.backend} \u00b7 ${job.uid.slice(0, 8)}`));
    this.filter.append(el('option', '', 'all states', { value: '' }));
    for (const s of TASK_STATES) {
      this.filter.append(el('option', '', s, { value: s }));
    }
    this.filter.addEventListener('change', () => {
      this.state = this.filter.value;
      this.offset = 0;
      void this.poll.refresh();
    });
    this.prev.addEventListener('click', () => {
      this.offset = Math.max(0, this.offset - PAGE_SIZE);
      void this.poll.refresh();
    });
    this.next.addEventListener('click', () => {
      this.offset += PAGE_SIZE;
      void this.poll.refresh();
    });
    const pager = el('div', 'pymw-tasks-pager');
    pager.append(this.filter, this.prev, this.range, this.next);
    const table = el('table', 'pymw-task-table');
    const header = el('tr');
    for (const h of ['#', 'state', 'host', 'attempts', 'duration', 'error']) {
      header.append(el('th', '', h));
    }
    table.append(el('thead'), this.body);
    table.tHead!.append(header);
    this.node.append(head, pager, this.note, table);
    this.poll = new Poll({
      auto: false,
      factory: () => this.load(getJob),
      frequency: { interval: 2000, backoff: true, max: 30000 },
      name: 'pymw-magic:tasks',
      standby: () => (this.isVisible ? 'when-hidden' : true)
    });
  }

  dispose(): void {
    if (!this.isDisposed) {
      this.poll.dispose();
    }
    super.dispose();
  }

  protected onAfterAttach(msg: Message): void {
    super.onAfterAttach(msg);
    void this.poll.start();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    void this.poll.refresh();
  }

  private async load(getJob: (uid: string) => JobRecord | undefined): Promise<void> {
    this.job = getJob(this.job.uid) ?? this.job;
    const page = await api.tasks(this.job.uid, this.offset, PAGE_SIZE, this.state || undefined);
    this.total = page.total;
    this.recorded = page.recorded;
    this.render(page.tasks);
    // A finished job's tasks no longer change: stop asking.
    if (this.job.state !== 'active') {
      this.poll.frequency = { interval: Poll.NEVER, backoff: false, max: Poll.NEVER };
    }
  }

  private render(tasks: TaskRecord[]): void {
    this.body.replaceChildren(...tasks.map(t => this.row(t)));
    const first = tasks.length ? this.offset + 1 : this.offset;
    const last = this.offset + tasks.length;
    const of = this.total === null ? '' : ` of ${this.total}`;
    this.range.textContent = tasks.length ? `tasks ${first}\u2013${last}${of}` : `no tasks${this.offset ? ' on this page' : ''}${of}`;
    this.prev.disabled = this.offset === 0;
    this.next.disabled = this.total !== null ? last >= this.total : tasks.length < PAGE_SIZE;
    if (!tasks.length && !this.offset && !(this.recorded ?? this.job.tasks_recorded)) {
      this.note.textContent =
        `Job ${this.job.name} runs on a ${this.job.family} backend (${this.job.backend}), whose tasks are ` +
        'recorded as counts only; its own kernel shows each task (%pymw dashboard).';
      this.note.hidden = false;
    } else {
      this.note.hidden = true;
    }
  }

  private row(t: TaskRecord): HTMLTableRowElement {
    const tr = el('tr', `pymw-task pymw-task-${t.state}`);
    const state = el('td', 'pymw-task-state');
    const dot = el('span', 'pymw-task-dot');
    dot.style.background = STATE_COLORS[t.state] ?? STATE_COLORS.pending;
    state.append(dot, document.createTextNode(t.state));
    const duration = t.started !== null && t.finished !== null ? seconds(t.finished - t.started) : '';
    const error = el('td', 'pymw-task-error');
    if (t.error) {
      if (t.traceback) {
        const details = el('details');
        details.append(el('summary', '', t.error), el('pre', 'pymw-task-traceback', t.traceback));
        error.append(details);
      } else {
        error.textContent = t.error;
      }
    }
    tr.append(
      el('td', 'pymw-task-index', String(t.index)),
      state,
      el('td', 'pymw-task-host', t.host ?? ''),
      el('td', 'pymw-task-attempts', String(t.attempts)),
      el('td', 'pymw-task-duration', duration),
      error
    );
    return tr;
  }
}
