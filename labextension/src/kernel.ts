/**
 * What the current kernel's pymw-magic session holds: whether the
 * extension is loaded, and its master's backend and worker count: the
 * default one, else the master of the job `%pymw attach` followed last.
 *
 * Asked of the kernel itself with a silent execute request whose only
 * content is a user expression: nothing is printed, the execution count
 * does not move, history is not stored, and no name is bound in the
 * user's namespace.  The expression only reads what is already imported
 * (it never imports pymw_magic into a kernel that did not load it).  The
 * kernel is the one place that knows its default master: `%pymw use`
 * makes one without any job, so the job store cannot tell.
 */
import { Kernel, KernelMessage } from '@jupyterlab/services';

export interface PymwKernelState {
  /** `%load_ext pymw_magic` was run in this kernel. */
  loaded: boolean;
  backend: string | null;
  workers: number | null;
}

// One Python expression; a JSON string (its repr comes back as text/plain).
const EXPRESSION =
  "__import__('json').dumps((lambda sm: {'loaded': False, 'backend': None, 'workers': None} if sm is None " +
  "else (lambda s: (lambda m: {'loaded': s is not None, 'backend': getattr(m, 'backend_name', None), " +
  "'workers': getattr(m, 'workers', None) if m is not None and not getattr(m, 'closed', False) else None})" +
  "((lambda d: d if d is not None else getattr(s, 'attached', None))(getattr(s, 'default', None))))" +
  "(sm.of(get_ipython())))(__import__('sys').modules.get('pymw_magic.session')))";

/** Python's repr of an ASCII str back to the str. */
function unrepr(text: string): string {
  const q = text[0];
  if ((q === "'" || q === '"') && text.endsWith(q)) {
    return text.slice(1, -1).replace(/\\(.)/g, '$1');
  }
  return text;
}

/** No answer in time: the kernel runs a long cell (the request waits behind it). */
export const NO_ANSWER = 'no answer';

/**
 * Ask `kernel`: its state; null when it cannot tell (not an IPython
 * kernel, restarted meanwhile, dead or shut down); NO_ANSWER after
 * `timeout` ms.  Never rejects: its callers run from signals.
 */
export async function probeKernel(
  kernel: Kernel.IKernelConnection,
  timeout = 30000
): Promise<PymwKernelState | null | typeof NO_ANSWER> {
  if (kernel.isDisposed || kernel.status === 'dead') {
    return null; // (requestExecute would throw "Kernel is dead")
  }
  let future: Kernel.IShellFuture<KernelMessage.IExecuteRequestMsg, KernelMessage.IExecuteReplyMsg>;
  try {
    future = kernel.requestExecute(
      { code: '', silent: true, store_history: false, user_expressions: { pymw: EXPRESSION }, allow_stdin: false },
      true
    );
  } catch {
    return null; // it died or was shut down meanwhile: nothing to tell
  }
  let timer = 0;
  const expired = new Promise<typeof NO_ANSWER>(resolve => {
    timer = window.setTimeout(() => resolve(NO_ANSWER), timeout);
  });
  try {
    const reply = (await Promise.race([future.done, expired])) as KernelMessage.IExecuteReplyMsg | typeof NO_ANSWER;
    if (reply === NO_ANSWER) {
      return NO_ANSWER;
    }
    if (!reply || reply.content.status !== 'ok') {
      return null;
    }
    const result = (reply.content.user_expressions ?? {})['pymw'] as any;
    if (!result || result.status !== 'ok') {
      return null;
    }
    const text = result.data?.['text/plain'];
    if (typeof text !== 'string') {
      return null;
    }
    const value = JSON.parse(unrepr(text));
    return {
      loaded: !!value.loaded,
      backend: typeof value.backend === 'string' ? value.backend : null,
      workers: typeof value.workers === 'number' ? value.workers : null
    };
  } catch {
    return null;
  } finally {
    window.clearTimeout(timer);
  }
}
