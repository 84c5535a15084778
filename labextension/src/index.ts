/**
 * pymw-magic in JupyterLab: the plugin that wires the pieces into the shell.
 *
 *   GET pymw/api/jobs ──▶ JobsPanel (left area, restored with the layout)
 *                            │ Cancel / Remove ──▶ POST cancel, DELETE
 *                            │ Show tasks ──▶ TasksView (main area) ◀── GET tasks
 *                            └ Attach ──▶ a `%pymw attach NAME` cell, run
 *   notebook ── Export (File menu, toolbar, palette) ──▶ POST export ──▶ open the .py
 *   kernel ◀── silent user expression ── PymwStatus (status bar) ── click ──▶ JobsPanel
 *
 * The sidebar reads the job store through the server, so it lists every
 * job of every kernel and script, including jobs whose kernel is gone.
 */
import { ILabShell, ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget, showErrorMessage, ToolbarButton } from '@jupyterlab/apputils';
import { DocumentRegistry } from '@jupyterlab/docregistry';
import { IMainMenu } from '@jupyterlab/mainmenu';
import { INotebookModel, INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { IDisposable } from '@lumino/disposable';

import { JobRecord } from './api';
import { exportNotebook } from './exporter';
import { NO_ANSWER, probeKernel } from './kernel';
import { JobsPanel } from './sidebar';
import { PymwStatus } from './status';
import { TasksView } from './tasks';

const PLUGIN_ID = 'pymw-magic:plugin';
export const CommandIDs = {
  export: 'pymw-magic:export-script',
  openSidebar: 'pymw-magic:open-jobs',
  refresh: 'pymw-magic:refresh-jobs'
};

const ICON_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">' +
  '<g class="jp-icon3" fill="#616161"><rect x="1" y="2" width="14" height="3" rx="1"/>' +
  '<rect x="1" y="7" width="9" height="3" rx="1"/><rect x="1" y="12" width="5" height="3" rx="1"/></g></svg>';
export const pymwIcon = new LabIcon({ name: 'pymw-magic:jobs', svgstr: ICON_SVG });

/**
 * What `%pymw attach` reads as this job and nothing else: its name when
 * that is one plain word the store cannot take for the start of a job id
 * (4+ hex digits) and the magic not for an option (a leading "-"), and no
 * newer job has it; else its uid.  Nothing else reaches the cell: a name
 * can come from anywhere, and the cell is code.
 */
export function attachKey(job: JobRecord, all: JobRecord[]): string {
  if (!/^[0-9a-f]{4,}$/.test(job.uid)) {
    throw new Error(`job ${JSON.stringify(job.name)} has an id %pymw attach cannot take: ${JSON.stringify(job.uid)}`);
  }
  const newest = all.filter(j => j.name === job.name).sort((a, b) => b.created - a.created)[0];
  const plain = /^[A-Za-z0-9_.:][A-Za-z0-9_.:-]*$/.test(job.name) && !/^[0-9a-fA-F]{4,}$/.test(job.name);
  return plain && (!newest || newest.uid === job.uid) ? job.name : job.uid;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'A jobs sidebar across kernels, Export as batch script, and the kernel\u2019s backend in the status bar.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ILayoutRestorer, ICommandPalette, IMainMenu, IStatusBar, ILabShell],
  activate: (
    app: JupyterFrontEnd,
    notebooks: INotebookTracker,
    restorer: ILayoutRestorer | null,
    palette: ICommandPalette | null,
    mainMenu: IMainMenu | null,
    statusBar: IStatusBar | null,
    labShell: ILabShell | null
  ) => {
    const { commands, shell } = app;
    const taskViews = new Map<string, MainAreaWidget<TasksView>>();

    const panel: JobsPanel = new JobsPanel({
      attach: async job => {
        const nb = notebooks.currentWidget;
        if (!nb) {
          throw new Error('Open the notebook to attach the job in first.');
        }
        await nb.sessionContext.ready;
        const kernel = nb.sessionContext.session?.kernel;
        if (!kernel || kernel.isDisposed || kernel.status === 'dead') {
          throw new Error(
            `The kernel of ${nb.title.label} is not running: start it (Kernel menu, Restart Kernel), then Attach again.`
          );
        }
        const state = await probeKernel(kernel, 5000);
        const loaded = state !== null && state !== NO_ANSWER && state.loaded;
        const key = attachKey(job, panel.jobs());
        // %load_ext of a loaded extension only says so: when unsure, load it.
        const source = (loaded ? '' : '%load_ext pymw_magic\n') + `%pymw attach ${key}`;
        const notebook = nb.content;
        NotebookActions.insertBelow(notebook);
        // A new cell is of the user's default type, which may be Markdown: this one is code.
        NotebookActions.changeCellType(notebook, 'code');
        const cell = notebook.activeCell;
        if (!cell) {
          throw new Error('Could not add a cell to the notebook.');
        }
        cell.model.sharedModel.setSource(source);
        shell.activateById(nb.id);
        await NotebookActions.run(notebook, nb.sessionContext);
      },
      showTasks: job => {
        let view = taskViews.get(job.uid);
        if (!view || view.isDisposed) {
          view = new MainAreaWidget({ content: new TasksView(job, uid => panel.job(uid)) });
          view.id = `pymw-tasks-${job.uid}`;
          view.title.label = `Tasks: ${job.name}`;
          view.title.icon = pymwIcon;
          taskViews.set(job.uid, view);
          view.disposed.connect(() => taskViews.delete(job.uid));
          shell.add(view, 'main');
        }
        shell.activateById(view.id);
      }
    });
    panel.id = 'pymw-jobs';
    panel.title.icon = pymwIcon;
    panel.title.caption = 'pymw jobs';
    shell.add(panel, 'left', { rank: 650 });
    if (restorer) {
      restorer.add(panel, 'pymw-jobs');
    }

    // A cell that ended may have started, attached or cancelled a job; a
    // kernel that turns busy may be starting one.
    NotebookActions.executed.connect(() => {
      if (panel.isVisible) {
        void panel.refresh();
      }
    });
    notebooks.widgetAdded.connect((_, nb) => {
      nb.sessionContext.statusChanged.connect((__, status) => {
        if (status === 'busy') {
          panel.refreshSoon();
        }
      });
    });

    commands.addCommand(CommandIDs.openSidebar, {
      label: 'Show pymw Jobs',
      caption: 'The jobs sidebar: every job of every kernel and script',
      icon: pymwIcon,
      execute: () => shell.activateById(panel.id)
    });
    commands.addCommand(CommandIDs.refresh, {
      label: 'Refresh pymw Jobs',
      execute: () => panel.refresh()
    });

    const currentNotebook = (args: Record<string, unknown>): NotebookPanel | null => {
      const path = typeof args.path === 'string' ? args.path : null;
      if (path) {
        return notebooks.find(p => p.context.path === path) ?? null;
      }
      return notebooks.currentWidget;
    };
    commands.addCommand(CommandIDs.export, {
      label: 'Export Notebook as Batch Script',
      caption: 'Save the notebook and export it as a plain Python script beside it (pymw-magic)',
      isEnabled: () => notebooks.currentWidget !== null,
      execute: async args => {
        const nb = currentNotebook(args as Record<string, unknown>);
        if (!nb) {
          await showErrorMessage('Export as batch script', 'Open a notebook first.');
          return null;
        }
        return exportNotebook(nb, { open: path => commands.execute('docmanager:open', { path }) });
      }
    });
    notebooks.currentChanged.connect(() => commands.notifyCommandChanged(CommandIDs.export));

    if (palette) {
      palette.addItem({ command: CommandIDs.export, category: 'Notebook Operations' });
      palette.addItem({ command: CommandIDs.openSidebar, category: 'pymw-magic' });
      palette.addItem({ command: CommandIDs.refresh, category: 'pymw-magic' });
    }
    if (mainMenu) {
      mainMenu.fileMenu.addGroup([{ command: CommandIDs.export }], 60);
    }

    // The notebook toolbar's Export button.
    class ExportButton implements DocumentRegistry.IWidgetExtension<NotebookPanel, INotebookModel> {
      createNew(nb: NotebookPanel): IDisposable {
        const button = new ToolbarButton({
          className: 'pymw-export-button',
          label: 'Export script',
          tooltip: 'Export as batch script (pymw-magic): save, export beside the notebook, open the .py',
          onClick: () => {
            void commands.execute(CommandIDs.export, { path: nb.context.path });
          }
        });
        nb.toolbar.insertItem(10, 'pymw-export', button);
        return button;
      }
    }
    app.docRegistry.addWidgetExtension('Notebook', new ExportButton());

    if (statusBar) {
      const status = new PymwStatus(() => shell.activateById(panel.id));
      statusBar.registerStatusItem('pymw-magic:status', {
        item: status,
        align: 'left',
        rank: 5,
        isActive: () => notebooks.currentWidget !== null
      });
      const follow = () => {
        const current = labShell ? labShell.currentWidget : notebooks.currentWidget;
        // Only a notebook is followed; the item stays with the last one
        // while another kind of widget (the task table) has the focus.
        if (current && notebooks.has(current)) {
          status.setContext((current as NotebookPanel).sessionContext);
        } else if (!notebooks.currentWidget) {
          status.setContext(null);
        }
      };
      notebooks.currentChanged.connect(follow);
      if (labShell) {
        labShell.currentChanged.connect(follow);
      }
      follow();
      NotebookActions.executed.connect((_, { notebook }) => {
        if (notebooks.currentWidget?.content === notebook) {
          void status.update_();
        }
      });
    }
  }
};

export default plugin;
