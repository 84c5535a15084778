/**
 * The status bar item: the current kernel's pymw-magic backend and worker
 * count ("pymw: local · 4 workers"), or "pymw: no master"; a click opens
 * the jobs sidebar.  It asks the kernel (kernel.ts) when the current
 * notebook changes, its kernel changes or restarts, and after each cell the
 * notebook runs (that is when `%pymw use` can have changed it).
 */
import { Widget } from '@lumino/widgets';
import { ISessionContext } from '@jupyterlab/apputils';

import { NO_ANSWER, probeKernel, PymwKernelState } from './kernel';

export class PymwStatus extends Widget {
  private context: ISessionContext | null = null;
  private generation = 0;
  private inFlight: Promise<void> | null = null;
  private again = false;
  /** The kernel restarted: ask again once it is idle. */
  private stale = false;
  /** The last answer for the current kernel (null: unknown). */
  state: PymwKernelState | null = null;

  constructor(onClick: () => void) {
    super({ node: document.createElement('div') });
    this.addClass('pymw-status');
    this.addClass('jp-StatusBar-TextItem');
    this.node.title = 'pymw-magic: this kernel\u2019s backend (click: the jobs sidebar)';
    this.node.addEventListener('click', onClick);
    this.show_(null);
  }

  /** Follow another notebook's session (null: none is current). */
  setContext(context: ISessionContext | null): void {
    if (context === this.context) {
      return;
    }
    if (this.context) {
      this.context.kernelChanged.disconnect(this.onKernel, this);
      this.context.statusChanged.disconnect(this.onStatus, this);
    }
    this.context = context;
    this.generation++;
    this.state = null;
    this.show_(null);
    if (context) {
      context.kernelChanged.connect(this.onKernel, this);
      context.statusChanged.connect(this.onStatus, this);
      void this.update_();
    }
  }

  /** Ask the kernel again (coalesced: one request at a time). */
  update_(): Promise<void> {
    if (this.inFlight) {
      this.again = true;
      return this.inFlight;
    }
    const run = async () => {
      do {
        this.again = false;
        const generation = this.generation;
        const context = this.context;
        const kernel = context?.session?.kernel;
        if (!context || !kernel) {
          this.show_(null);
          continue;
        }
        if (!context.isReady) {
          await context.ready;
        }
        if (kernel.isDisposed || kernel.status === 'dead') {
          this.show_(null); // a dead kernel holds no master
          continue;
        }
        const state = await probeKernel(kernel);
        if (state === NO_ANSWER) {
          continue; // busy with a long cell: keep what is shown; its end asks again
        }
        if (generation === this.generation && this.context?.session?.kernel === kernel) {
          this.state = state;
          this.show_(state);
        }
      } while (this.again);
    };
    // Called from signals (no one awaits it): a failure shows "no master", never an unhandled rejection.
    this.inFlight = run()
      .catch(() => this.show_(null))
      .finally(() => {
        this.inFlight = null;
      });
    return this.inFlight;
  }

  private onKernel(): void {
    this.generation++;
    this.state = null;
    this.show_(null);
    void this.update_();
  }

  private onStatus(_: ISessionContext, status: string): void {
    if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
      this.generation++;
      this.state = null;
      this.stale = true;
      this.show_(null);
    } else if (status === 'idle' && this.stale) {
      this.stale = false;
      void this.update_();
    }
  }

  private show_(state: PymwKernelState | null): void {
    let text = 'pymw: no master';
    if (state && state.backend) {
      const n = state.workers;
      text = `pymw: ${state.backend}` + (n === null ? '' : ` \u00b7 ${n} worker${n === 1 ? '' : 's'}`);
    }
    this.node.textContent = text;
    this.node.dataset.backend = state?.backend ?? '';
  }
}
