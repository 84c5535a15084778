/**
 * "Export as batch script": save the notebook, have the server export it
 * beside itself (analysis.ipynb -> analysis.py), open the script.  Cells
 * the exporter cannot translate are listed in a dialog (cell, line, the
 * line as written, the exporter's reason) that offers to export with them
 * commented out; a file in the way that is not an earlier export is only
 * replaced when the user says so.
 */
import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { NotebookPanel } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { api, ApiError, ExportProblem, ExportResult } from './api';
import { el } from './format';

export interface ExportDeps {
  open: (path: string) => Promise<unknown>;
}

function problemsOf(error: ApiError): ExportProblem[] | null {
  const problems = error.body && typeof error.body === 'object' ? error.body.problems : null;
  return Array.isArray(problems) && problems.length ? (problems as ExportProblem[]) : null;
}

/** The dialog's body: the exporter's message and one row per problem, as text. */
export function problemsBody(message: string, problems: ExportProblem[]): Widget {
  const node = el('div', 'pymw-export-problems');
  node.append(
    el('p', '', `${problems.length} cell line(s) have no plain-Python meaning, so the notebook cannot be exported as it is:`)
  );
  const list = el('ul', 'pymw-export-problem-list');
  for (const p of problems) {
    const item = el('li', 'pymw-export-problem');
    item.append(
      el('span', 'pymw-export-where', `cell ${p.cell}, line ${p.line}: `),
      el('code', 'pymw-export-source', String(p.source ?? '').trim()),
      el('div', 'pymw-export-reason', String(p.reason ?? ''))
    );
    list.append(item);
  }
  node.append(list);
  const details = el('details', 'pymw-export-message');
  details.append(el('summary', '', 'The exporter\u2019s message'), el('pre', '', message));
  node.append(
    details,
    el('p', '', 'Rewrite them in Python, or export with them commented out (the script marks each with a warning).')
  );
  return new Widget({ node });
}

/** Export the notebook of `panel`; resolves with the script's path, or null if not
 * exported (every failure is shown in a dialog: it never rejects). */
export async function exportNotebook(panel: NotebookPanel, deps: ExportDeps): Promise<string | null> {
  try {
    return await exportOnce(panel, deps);
  } catch (error) {
    await showErrorMessage('Export as batch script', String((error as Error)?.message ?? error));
    return null;
  }
}

async function exportOnce(panel: NotebookPanel, deps: ExportDeps): Promise<string | null> {
  await panel.context.ready;
  if (panel.context.model.dirty || !panel.context.contentsModel) {
    await panel.context.save();
  }
  // The server knows paths relative to its root: a document of another
  // drive (jupyter-collaboration's "RTC:") has that path as localPath.
  const path = panel.context.localPath || panel.context.path;
  const drive = panel.context.path.endsWith(path) ? panel.context.path.slice(0, -path.length) : '';
  const options: Record<string, unknown> = {};
  for (;;) {
    let result: ExportResult;
    try {
      result = await api.exportNotebook(path, options);
    } catch (error) {
      if (!(error instanceof ApiError)) {
        await showErrorMessage('Export as batch script', String((error as Error)?.message ?? error));
        return null;
      }
      const problems = problemsOf(error);
      if (problems && !options.comment_unsupported) {
        const answer = await showDialog({
          title: `Cannot export ${panel.context.localPath.split('/').pop()} as it is`,
          body: problemsBody(error.message, problems),
          buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Export with them commented out' })]
        });
        if (!answer.button.accept) {
          return null;
        }
        options.comment_unsupported = true;
        continue;
      }
      if (error.status === 409 && error.body?.exists && !options.overwrite) {
        const answer = await showDialog({
          title: 'Replace the file?',
          body: error.message,
          buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Replace' })]
        });
        if (!answer.button.accept) {
          return null;
        }
        options.overwrite = true;
        continue;
      }
      await showErrorMessage('Export as batch script', error.message);
      return null;
    }
    // Opened in the notebook's drive, as the notebook was.
    await deps.open(drive + result.path);
    return result.path;
  }
}
