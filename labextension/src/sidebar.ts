/**
 * The jobs sidebar: every job in the store, of every kernel and script,
 * newest first, grouped running / finished.
 *
 * Owns: polling GET jobs (fast while something runs and changes, backing
 * off while nothing changes, slow when nothing runs, not at all while the
 * panel or the page is hidden), keeping one row per job updated in place
 * (so a button is never swapped under the pointer), and the per-job
 * actions: Cancel, Attach in this notebook, Show tasks, Remove.  What
 * Attach and Show tasks do is the plugin's (it knows the notebooks and the
 * main area).
 */
import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { Poll } from '@lumino/polling';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { api, ApiError, JobRecord } from './api';
import { countsText, el, figures, origin, originDetail, rateText, seconds, setText, StateBar } from './format';

/** Poll intervals, in ms. */
export const POLL = {
  /** while a job runs and its counts move */
  active: 1000,
  /** the most a running job's poll backs off to while nothing changes */
  activeMax: 5000,
  /** nothing runs: only new jobs can appear (a notebook's kernel turning busy also refreshes) */
  quiet: 5000,
  /** the server does not answer */
  errorMax: 60000
};

/** The newest jobs the sidebar shows (every running one besides); "Show
 * older jobs" adds as many again. */
export const MAX_JOBS = 300;

export interface JobsPanelOptions {
  attach: (job: JobRecord) => Promise<void>;
  showTasks: (job: JobRecord) => void;
}

/** One job's row, updated in place. */
class JobItem {
  readonly node = el('li', 'pymw-sidebar-job');
  private nameNode = el('span', 'pymw-sidebar-name');
  private stateNode = el('span', 'pymw-sidebar-state');
  private backendNode = el('span', 'pymw-sidebar-backend');
  private bar = new StateBar();
  private countsNode = el('div', 'pymw-sidebar-counts');
  private statsNode = el('div', 'pymw-sidebar-stats');
  private originNode = el('div', 'pymw-sidebar-origin');
  readonly cancelButton = el('button', 'jp-mod-styled pymw-sidebar-cancel', 'Cancel', { type: 'button' });
  readonly attachButton = el('button', 'jp-mod-styled pymw-sidebar-attach', 'Attach in this notebook', {
    type: 'button'
  });
  readonly tasksButton = el('button', 'jp-mod-styled pymw-sidebar-tasks', 'Show tasks', { type: 'button' });
  readonly removeButton = el('button', 'jp-mod-styled pymw-sidebar-remove', 'Remove', { type: 'button' });
  job: JobRecord;
  /** A Cancel or Remove of this row is under way: a second click does nothing. */
  busy = false;

  constructor(job: JobRecord) {
    this.job = job;
    this.node.dataset.uid = job.uid;
    const head = el('div', 'pymw-sidebar-head');
    head.append(this.nameNode, this.stateNode, this.backendNode);
    const actions = el('div', 'pymw-sidebar-actions');
    actions.append(this.cancelButton, this.attachButton, this.tasksButton, this.removeButton);
    this.node.append(head, this.bar.node, this.countsNode, this.statsNode, this.originNode, actions);
    this.update(job);
  }

  update(job: JobRecord): void {
    this.job = job;
    const active = job.state === 'active';
    const className = `pymw-sidebar-job pymw-sidebar-job-${job.state}`;
    if (this.node.className !== className) {
      this.node.className = className;
    }
    setText(this.nameNode, job.name);
    this.nameNode.title = `${job.name} (${job.uid})`;
    const cancelling = active && job.cancel_requested;
    setText(this.stateNode, cancelling ? 'cancelling' : job.state);
    setText(this.backendNode, job.backend);
    this.bar.update(job.counts, job.total);
    const total = job.total === null ? '?' : String(job.total);
    setText(this.countsNode, `${countsText(job.counts)} (of ${total})`);
    const f = figures(job);
    setText(this.statsNode, `${rateText(f.rate)} tasks/s \u00b7 ${seconds(f.elapsed)} \u00b7 ETA ${seconds(f.eta)}`);
    setText(this.originNode, origin(job));
    this.originNode.title = originDetail(job);
    this.cancelButton.hidden = !active;
    // A batch job's follower may have gone since it was asked: Cancel again
    // goes through the engine then, so it stays clickable.
    this.cancelButton.disabled = (cancelling && job.family !== 'batch') || this.busy;
    this.removeButton.hidden = active;
    this.removeButton.disabled = this.busy;
    // Only a batch job outlives its process and can be followed elsewhere.
    this.attachButton.hidden = job.family !== 'batch';
  }
}

export class JobsPanel extends Widget {
  private options: JobsPanelOptions;
  private items = new Map<string, JobItem>();
  private running = el('ul', 'pymw-sidebar-list');
  private finished = el('ul', 'pymw-sidebar-list');
  private runningTitle = el('h3', 'pymw-sidebar-group-title');
  private finishedTitle = el('h3', 'pymw-sidebar-group-title');
  private message = el('div', 'pymw-sidebar-message');
  private more = el('button', 'jp-mod-styled pymw-sidebar-more', 'Show older jobs', { type: 'button' });
  private limit = MAX_JOBS;
  private lastSeen = '';
  private soon = 0;
  private poll: Poll;

  constructor(options: JobsPanelOptions) {
    super();
    this.options = options;
    this.addClass('pymw-sidebar');
    const header = el('div', 'pymw-sidebar-header');
    const refresh = el('button', 'jp-mod-styled pymw-sidebar-refresh', 'Refresh', { type: 'button' });
    refresh.addEventListener('click', () => void this.refresh());
    header.append(el('span', 'pymw-sidebar-title', 'pymw jobs'), refresh);
    const runningGroup = el('section', 'pymw-sidebar-group pymw-sidebar-running');
    runningGroup.append(this.runningTitle, this.running);
    const finishedGroup = el('section', 'pymw-sidebar-group pymw-sidebar-finished');
    finishedGroup.append(this.finishedTitle, this.finished);
    this.more.hidden = true;
    this.more.addEventListener('click', () => {
      this.limit += MAX_JOBS;
      void this.refresh();
    });
    this.node.append(header, this.message, runningGroup, finishedGroup, this.more);
    this.node.addEventListener('click', event => this.onClick(event));
    this.poll = new Poll({
      auto: false,
      factory: () => this.load(),
      frequency: { interval: POLL.active, backoff: true, max: POLL.errorMax },
      name: 'pymw-magic:jobs',
      // Paused while the panel is not shown, and while the page is hidden.
      standby: () => (this.isVisible ? 'when-hidden' : true)
    });
    this.render([]);
  }

  /** Fetch now (a notebook's cell ended, the panel was shown, Refresh). */
  refresh(): Promise<void> {
    return this.poll.refresh();
  }

  /** Fetch soon: a kernel turned busy, and may start a job that its
   * recorder writes within about a second. */
  refreshSoon(delay = 1200): void {
    if (this.soon || !this.isVisible) {
      return;
    }
    this.soon = window.setTimeout(() => {
      this.soon = 0;
      void this.poll.refresh();
    }, delay);
  }

  /** The rows, for the plugin's commands. */
  job(uid: string): JobRecord | undefined {
    return this.items.get(uid)?.job;
  }

  jobs(): JobRecord[] {
    return [...this.items.values()].map(i => i.job);
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this.poll.dispose();
    window.clearTimeout(this.soon);
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

  private async load(): Promise<void> {
    let jobs: JobRecord[];
    let capped = false;
    try {
      const limit = this.limit;
      jobs = await api.jobs({ limit: limit + 1 }); // (one more: whether older ones exist)
      if (jobs.length > limit) {
        // A store with many jobs: the newest, and every running one.
        capped = true;
        jobs = jobs.slice(0, limit);
        const seen = new Set(jobs.map(j => j.uid));
        jobs = jobs.concat((await api.jobs({ active: true })).filter(j => !seen.has(j.uid)));
      }
    } catch (error) {
      this.message.textContent = `Cannot read the job store: ${(error as Error).message ?? error}`;
      this.message.hidden = false;
      throw error; // the poll backs off
    }
    this.message.hidden = jobs.length > 0 && !capped;
    this.message.textContent = capped
      ? `The ${this.limit} newest jobs and every running one: remove old ones (Remove, or %pymw jobs --remove NAME).`
      : 'No jobs in the store yet: a %%pymw cell or a script records its jobs here.';
    this.more.hidden = !capped;
    this.render(jobs);
    // Fast while running jobs move, backing off while they do not; slow
    // (a new job is also picked up when a notebook cell ends) when none runs.
    const active = jobs.filter(j => j.state === 'active');
    const seen = JSON.stringify(active.map(j => [j.uid, j.counts, j.cancel_requested]));
    const frequency = this.poll.frequency;
    if (!active.length) {
      this.poll.frequency = { interval: POLL.quiet, backoff: true, max: POLL.errorMax };
    } else if (seen !== this.lastSeen) {
      this.poll.frequency = { interval: POLL.active, backoff: true, max: POLL.errorMax };
    } else {
      const next = Math.min(Math.round(Math.max(frequency.interval, POLL.active) * 1.5), POLL.activeMax);
      this.poll.frequency = { interval: next, backoff: true, max: POLL.errorMax };
    }
    this.lastSeen = seen;
  }

  private render(jobs: JobRecord[]): void {
    jobs = [...jobs].sort((a, b) => b.created - a.created);
    const keep = new Set(jobs.map(j => j.uid));
    for (const [uid, item] of this.items) {
      if (!keep.has(uid)) {
        item.node.remove();
        this.items.delete(uid);
      }
    }
    const running: HTMLElement[] = [];
    const finished: HTMLElement[] = [];
    for (const job of jobs) {
      let item = this.items.get(job.uid);
      if (item) {
        item.update(job);
      } else {
        item = new JobItem(job);
        this.items.set(job.uid, item);
      }
      (job.state === 'active' ? running : finished).push(item.node);
    }
    arrange(this.running, running);
    arrange(this.finished, finished);
    const nRunning = running.length;
    const nFinished = finished.length;
    this.runningTitle.textContent = `Running (${nRunning})`;
    this.finishedTitle.textContent = `Finished (${nFinished})`;
  }

  private onClick(event: MouseEvent): void {
    const target = event.target as HTMLElement;
    const button = target.closest('button');
    const row = target.closest('li.pymw-sidebar-job') as HTMLElement | null;
    if (!button || !row || !row.dataset.uid) {
      return;
    }
    const item = this.items.get(row.dataset.uid);
    if (!item) {
      return;
    }
    if (button === item.cancelButton) {
      void this.cancel(item);
    } else if (button === item.attachButton) {
      this.options.attach(item.job).catch(error => showErrorMessage('Cannot attach the job', String(error?.message ?? error)));
    } else if (button === item.tasksButton) {
      this.options.showTasks(item.job);
    } else if (button === item.removeButton) {
      void this.remove(item);
    }
  }

  private async cancel(item: JobItem): Promise<void> {
    if (item.busy) {
      return; // (a double click: one request)
    }
    item.busy = true;
    item.cancelButton.disabled = true;
    try {
      await api.cancel(item.job.uid);
    } catch (error) {
      // It ended meanwhile (409 with its state): nothing to say, the next list shows it.
      const ended = error instanceof ApiError && error.status === 409 && error.body?.state && error.body.state !== 'lost';
      const gone = error instanceof ApiError && error.status === 404;
      if (!ended && !gone) {
        await showErrorMessage(`Cannot cancel job ${item.job.name}`, String((error as Error).message ?? error));
      }
    } finally {
      item.busy = false;
    }
    await this.refresh();
  }

  private async remove(item: JobItem): Promise<void> {
    if (item.busy) {
      return;
    }
    item.busy = true;
    item.removeButton.disabled = true;
    try {
      const job = item.job;
      // The second click of a double click on Remove lands on the dialog's
      // backdrop, which would dismiss it at once: that click goes nowhere.
      const swallow = (event: MouseEvent) => {
        if (event.detail > 1) {
          event.stopPropagation();
          event.preventDefault();
        }
      };
      document.addEventListener('click', swallow, true);
      let answer;
      try {
        answer = await showDialog({
          title: 'Remove job',
          body: textBody(
            `Remove the finished job ${job.name} (${job.uid.slice(0, 8)}) and its task records from the job store?`
          ),
          buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Remove' })]
        });
      } finally {
        document.removeEventListener('click', swallow, true);
      }
      if (!answer.button.accept) {
        return;
      }
      try {
        await api.remove(job.uid);
      } catch (error) {
        if (!(error instanceof ApiError && error.status === 404)) {
          // (404: removed meanwhile, by another page or a kernel: what was asked is done)
          await showErrorMessage(`Cannot remove job ${job.name}`, String((error as Error).message ?? error));
        }
      }
    } finally {
      item.busy = false;
      item.removeButton.disabled = false;
    }
    await this.refresh();
  }
}

/** A dialog's body as text that wraps anywhere (a name can be one long word). */
function textBody(text: string): Widget {
  return new Widget({ node: el('p', 'pymw-dialog-text', text) });
}

/** Make `list`'s children exactly `nodes`, in order, moving only when needed. */
function arrange(list: HTMLElement, nodes: HTMLElement[]): void {
  nodes.forEach((node, i) => {
    if (list.children[i] !== node) {
      list.insertBefore(node, list.children[i] ?? null);
    }
  });
  while (list.children.length > nodes.length) {
    list.lastElementChild!.remove();
  }
}
