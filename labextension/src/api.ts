/**
 * The server extension's REST API (`{base_url}pymw/api/`), typed.
 *
 * Owns: building the URLs (under the server's base URL, so it works behind
 * JupyterHub's prefix), sending requests with Jupyter's token and XSRF
 * cookie (ServerConnection), turning error replies into ApiError, and the
 * server clock's offset (from the Date header) so elapsed times are not
 * skewed by the browser's clock.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export const TASK_STATES = ['pending', 'running', 'retrying', 'done', 'failed', 'cancelled'] as const;
export type TaskState = (typeof TASK_STATES)[number];
export type Counts = Record<TaskState, number>;

export interface Owner {
  kind: string;
  pid: number;
  host: string;
  start: number | null;
  kernel_id: string | null;
  script: string | null;
}

/** A stored job, as `JobRecord.as_dict()` sends it. */
export interface JobRecord {
  uid: string;
  job_id: number | null;
  name: string;
  backend: string;
  family: string;
  state: string;
  counts: Counts;
  total: number | null;
  options: Record<string, unknown>;
  owner: Owner;
  notebook: string | null;
  created: number;
  ended: number | null;
  updated_at: number;
  cancel_requested: boolean;
  tasks_recorded: boolean;
  /** Figured by the server when it answered (its clock): seconds, tasks/s, seconds left. */
  elapsed?: number;
  rate?: number | null;
  eta?: number | null;
}

/** A stored task, as `TaskRecord.as_dict()` sends it. */
export interface TaskRecord {
  job_uid: string;
  index: number;
  state: string;
  attempts: number;
  host: string | null;
  worker: string | null;
  submitted: number | null;
  started: number | null;
  finished: number | null;
  result_location: string | null;
  error: string | null;
  traceback: string | null;
}

export interface TaskPage {
  tasks: TaskRecord[];
  /** How many tasks match (all pages), when the server says. */
  total: number | null;
  /** Whether the job records its tasks (batch jobs do; pool jobs count only). */
  recorded: boolean | null;
}

/** One cell line the exporter could not translate. */
export interface ExportProblem {
  cell: number;
  line: number;
  source: string;
  reason: string;
}

export interface ExportResult {
  /** The script's path, relative to the server root. */
  path: string;
  skipped: ExportProblem[];
}

/** A reply other than 2xx: the server's message and its JSON body. */
export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly body: any
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

let skew = 0; // seconds the server's clock is ahead of ours

/** Now on the server's clock, in seconds (what the store's times use). */
export function serverNow(): number {
  return Date.now() / 1000 + skew;
}

function noteServerDate(response: Response): void {
  const date = response.headers.get('Date');
  if (!date) {
    return;
  }
  const server = Date.parse(date) / 1000;
  if (!isNaN(server)) {
    const measured = server - Date.now() / 1000;
    // The header has whole seconds: only a real offset moves the clock.
    if (Math.abs(measured - skew) > 2) {
      skew = measured;
    }
  }
}

/** Call `endpoint` (relative to pymw/api/); JSON in, JSON out. */
export async function requestAPI<T>(
  endpoint: string,
  init: RequestInit = {},
  query: Record<string, string | number | undefined> = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  let url = URLExt.join(settings.baseUrl, 'pymw', 'api', endpoint);
  const params = Object.entries(query)
    .filter(([, v]) => v !== undefined && v !== '')
    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(String(v))}`);
  if (params.length) {
    url += '?' + params.join('&');
  }
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  noteServerDate(response);
  const text = await response.text();
  let data: any = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!response.ok) {
    let message = response.statusText || `HTTP ${response.status}`;
    if (data && typeof data === 'object' && (data.message || data.reason)) {
      message = String(data.message || data.reason);
    } else if (typeof data === 'string' && data.length < 500) {
      message = data;
    }
    throw new ApiError(message, response.status, data);
  }
  return data as T;
}

export const api = {
  async jobs(query: { limit?: number; active?: boolean } = {}): Promise<JobRecord[]> {
    const data = await requestAPI<any>('jobs', {}, { limit: query.limit, active: query.active ? 1 : undefined });
    return (Array.isArray(data) ? data : data?.jobs ?? []) as JobRecord[];
  },

  async tasks(uid: string, offset: number, limit: number, state?: string): Promise<TaskPage> {
    const data = await requestAPI<any>(`jobs/${encodeURIComponent(uid)}/tasks`, {}, { offset, limit, state });
    if (Array.isArray(data)) {
      return { tasks: data, total: null, recorded: null };
    }
    const total = data?.count ?? data?.total ?? null;
    const recorded = data?.tasks_recorded;
    return {
      tasks: (data?.tasks ?? []) as TaskRecord[],
      total: typeof total === 'number' ? total : null,
      recorded: typeof recorded === 'boolean' ? recorded : null
    };
  },

  async cancel(uid: string): Promise<void> {
    await requestAPI(`jobs/${encodeURIComponent(uid)}/cancel`, { method: 'POST' });
  },

  async remove(uid: string): Promise<void> {
    await requestAPI(`jobs/${encodeURIComponent(uid)}`, { method: 'DELETE' });
  },

  async exportNotebook(path: string, options: Record<string, unknown> = {}): Promise<ExportResult> {
    const data = await requestAPI<any>('export', {
      method: 'POST',
      body: JSON.stringify({ path, ...options })
    });
    const script = data?.path;
    return { path: String(script), skipped: (data?.skipped ?? []) as ExportProblem[] };
  }
};
