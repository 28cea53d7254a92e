/**
 * lepton-magic: a left-sidebar panel listing every pool, node and run of the
 * lepton_magic store, live, with actions. Works in JupyterLab 4 and Notebook 7
 * (both shells accept `shell.add(widget, 'left')`).
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { INotebookTracker } from '@jupyterlab/notebook';
import { LabIcon } from '@jupyterlab/ui-components';

import { LeptonModel } from './model';
import { LeptonSidebar } from './sidebar';

/** Three nodes joined to a hub: the pool. `jp-icon3` follows the theme. */
const LEPTON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <circle cx="12" cy="12" r="3.2"/>
    <circle cx="4.5" cy="5" r="2.3"/>
    <circle cx="19.5" cy="5" r="2.3"/>
    <circle cx="12" cy="21" r="2.3"/>
    <path d="M5.6 6.1l4.6 4.3-.9 1-4.6-4.3zM18.4 6.1l.9 1-4.6 4.3-.9-1zM11.3 14.8h1.4v4.2h-1.4z"/>
  </g>
</svg>`;

export const leptonIcon = new LabIcon({
  name: 'lepton-magic:sidebar',
  svgstr: LEPTON_SVG
});

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'lepton-magic:sidebar',
  description: 'Every lepton_magic pool, node and run, live, with actions.',
  autoStart: true,
  optional: [INotebookTracker, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker | null,
    restorer: ILayoutRestorer | null
  ) => {
    let sidebar: LeptonSidebar | null = null;
    const model = new LeptonModel({
      // Poll only while the panel is open and the browser tab is visible.
      standby: () => (sidebar?.isVisible ? 'when-hidden' : true)
    });
    sidebar = new LeptonSidebar(model, tracker, id =>
      app.shell.activateById(id)
    );
    sidebar.title.icon = leptonIcon;
    sidebar.title.label = 'Lepton';
    app.shell.add(sidebar, 'left', { rank: 900 });
    if (restorer) {
      restorer.add(sidebar, 'lepton-sidebar');
    }
    model.start();
  }
};

export default plugin;
