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

import { api, ApiError, JobRecord, TASK_STATES, TaskRecord } from './api';
import { el, seconds, STATE_COLORS } from './format';

export const PAGE_SIZE = 50;
/** How many of the newest jobs are searched for an ended job's final record. */
const RECENT = 300;

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
  private stateNode = el('span', 'pymw-tasks-state');
  private poll: Poll;

  constructor(job: JobRecord, getJob: (uid: string) => JobRecord | undefined) {
    super();
    this.job = job;
    this.addClass('pymw-tasks');
    this.title.label = `Tasks: ${job.name}`;
    this.title.caption = `The tasks of job ${job.name} (${job.uid})`;
    this.title.closable = true;
    const head = el('div', 'pymw-tasks-head');
    head.append(el('span', 'pymw-tasks-title', `Job ${job.name} \u00b7 ${job.backend} \u00b7 ${job.uid.slice(0, 8)}`), this.stateNode);
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

  /**
   * The job as the store has it now.  The sidebar's copy is fresh only
   * while the sidebar polls (not while it is collapsed, nor for a job it
   * no longer lists): a job it still thinks active is looked up among the
   * active ones, and once ended among the newest (else it just "ended").
   */
  private async current(getJob: (uid: string) => JobRecord | undefined): Promise<JobRecord> {
    const known = getJob(this.job.uid) ?? this.job;
    if (known.state !== 'active') {
      return known;
    }
    const live = (await api.jobs({ active: true })).find(j => j.uid === known.uid);
    if (live) {
      return live;
    }
    const ended = (await api.jobs({ limit: RECENT })).find(j => j.uid === known.uid);
    return ended && ended.state !== 'active' ? ended : { ...known, state: 'ended' };
  }

  private stop(): void {
    this.poll.frequency = { interval: Poll.NEVER, backoff: false, max: Poll.NEVER };
  }

  private async load(getJob: (uid: string) => JobRecord | undefined): Promise<void> {
    let page;
    try {
      // The job first: tasks read after it saw the job end are its last.
      this.job = await this.current(getJob);
      page = await api.tasks(this.job.uid, this.offset, PAGE_SIZE, this.state || undefined);
    } catch (error) {
      const gone = error instanceof ApiError && error.status === 404;
      this.note.textContent = gone
        ? `Job ${this.job.name} is no longer in the job store.`
        : `Cannot read the tasks: ${(error as Error)?.message ?? error}`;
      this.note.hidden = false;
      if (gone) {
        this.stop(); // removed: nothing more to ask
        return;
      }
      throw error; // the poll backs off
    }
    this.stateNode.textContent = this.job.state === 'active' ? 'running' : this.job.state;
    this.total = page.total;
    this.recorded = page.recorded;
    this.render(page.tasks);
    // A finished job's tasks no longer change: stop asking.
    if (this.job.state !== 'active') {
      this.stop();
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
