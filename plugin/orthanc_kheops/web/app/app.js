// The KHEOPS web app: status, failed instances, switching rules, studies and series.
//
// Plain ES modules, no framework and no build step: the plugin serves these files as they are.
// Server text only ever goes into the page as text nodes (never as HTML), and the plugin's
// routes never answer a token in clear. Views refresh every few seconds; a region is redrawn
// only when what it shows changed, in one step, keeping the keyboard focus where it was.
import { api, orthanc } from './api.js';
import { RESOURCE_STATES, describeCounts, plural, stateInWords, when } from './words.js';

const REFRESH_MS = 3000;
const view = document.getElementById('view');
const offline = document.getElementById('offline');
let generation = 0;  // bumped on every route change: stale refreshes stop themselves
let timer = null;
let lastRead = null;

// -- building the page ----------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) { continue; }
    if (key === 'class') { node.className = value; }
    else if (key.startsWith('on')) { node.addEventListener(key.slice(2), value); }
    else { node.setAttribute(key, value === true ? '' : String(value)); }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) { continue; }
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) { node.textContent = text; }
}

// Redraw a region only if what it shows changed, and keep the focus on the same control.
function swap(region, shown, build) {
  const key = JSON.stringify(shown);
  if (region.dataset.shown === key) { return; }
  const focused = document.activeElement;
  const focusKey = focused && region.contains(focused) ? focused.dataset.focus : null;
  region.replaceChildren(...[build()].flat(Infinity));
  region.dataset.shown = key;
  if (focusKey) {
    const again = region.querySelector('[data-focus="' + CSS.escape(focusKey) + '"]');
    if (again) { again.focus(); }
  }
}

function note(node, text, tone) {
  node.className = 'note' + (tone ? ' tone-' + tone : '');
  node.textContent = text;
}

function facts(pairs) {
  return pairs.map(([key, label, value]) =>
    [h('dt', {}, label), h('dd', { 'data-fact': key }, value)]);
}

// A form field: its label, the control, a hint and the place for the plugin's message.
function field(name, label, control, hint) {
  const id = control.id;
  const described = [hint ? id + '-hint' : '', id + '-error'].filter(Boolean).join(' ');
  control.setAttribute('aria-describedby', described);
  return h('div', { class: 'field', 'data-field': name },
    h('label', { for: id }, label), control,
    hint ? h('p', { class: 'hint', id: id + '-hint' }, hint) : null,
    h('p', { class: 'error', id: id + '-error' }));
}

function clearErrors(form) {
  form.querySelectorAll('.error').forEach((node) => { node.textContent = ''; });
  form.querySelectorAll('[aria-invalid]').forEach((node) => node.removeAttribute('aria-invalid'));
}

// The plugin's message goes next to the field it names, else to `general`.
function showError(form, error, general) {
  const slot = error.field && form.querySelector('.field[data-field="' + error.field + '"]');
  if (slot) {
    slot.querySelector('.error').textContent = error.message;
    const control = slot.querySelector('input, textarea, select');
    control.setAttribute('aria-invalid', 'true');
    control.focus();
  } else {
    general.textContent = error.message;
  }
}

// -- reading the API ------------------------------------------------------------------------

async function read(path) {
  try {
    const answer = await api('GET', path);
    lastRead = new Date();
    offline.hidden = true;
    return answer;
  } catch (error) {
    if (error.unreachable || error.status === 401) {
      setText(offline, 'Cannot reach the KHEOPS API: ' + error.message + '. ' +
        (lastRead ? 'What the page shows was read at ' + lastRead.toLocaleTimeString() + '; '
                  : '') + 'it tries again every ' + REFRESH_MS / 1000 + ' seconds.');
      offline.hidden = false;
    }
    throw error;
  }
}

function refreshing(load) {
  const mine = generation;
  const tick = async () => {
    if (mine !== generation) { return; }
    try { await load(); } catch { /* the banner or the view says it */ }
    if (mine === generation) { timer = setTimeout(tick, REFRESH_MS); }
  };
  tick();
}

// -- status: the state in words, the counts, the failed instances ---------------------------

function statusView() {
  const stateText = h('h2', { id: 'state-text' }, 'Reading the status…');
  const stateDetail = h('p', { id: 'state-detail' });
  const state = h('section', { class: 'card state', id: 'state', 'aria-label': 'State' },
    stateText, stateDetail);
  const connection = h('dl', { class: 'facts', id: 'connection' });
  const counts = h('dl', { class: 'facts', id: 'counts' });
  const failedTitle = h('h2', { id: 'failed-title' }, 'Failed instances');
  const retryNote = h('p', { class: 'note', id: 'retry-note', role: 'status' });
  const failedList = h('ul', { class: 'items', id: 'failed-list' });
  const retryAll = h('button', { type: 'button', class: 'primary', id: 'retry-all', hidden: true,
    onclick: () => retry(null) }, 'Retry all failed instances');

  view.replaceChildren(
    h('h1', {}, 'KHEOPS status'), state,
    h('div', { class: 'grid' },
      h('section', { class: 'card', 'aria-labelledby': 'album-title' },
        h('h2', { id: 'album-title' }, 'Main album'), connection),
      h('section', { class: 'card', 'aria-labelledby': 'counts-title' },
        h('h2', { id: 'counts-title' }, 'Instances'), counts)),
    h('section', { class: 'card', 'aria-labelledby': 'failed-title' },
      failedTitle, retryNote, failedList, h('div', { class: 'actions' }, retryAll)));

  async function load() {
    const [status, queue] = await Promise.all([
      read('status'), read('queue?state=failed&limit=100')]);
    const words = stateInWords(status);
    state.className = 'card state tone-' + words.tone;
    setText(stateText, words.text);
    setText(stateDetail, words.detail);
    const album = status.AlbumId ||
      (status.TokenActive === false ? 'none: KHEOPS says the token is not active' : 'unknown yet');
    const permissions = status.Permissions ? status.Permissions.join(', ') || 'none' : 'unknown yet';
    const connectionFacts = [
      ['Url', 'KHEOPS', status.Url], ['Token', 'Token (masked)', status.Token],
      ['Album', 'Album', album], ['Permissions', 'Permissions', permissions],
      ['LastSuccess', 'Last instance sent', when(status.LastSuccessAt)]];
    swap(connection, connectionFacts, () => facts(connectionFacts));
    const c = status.Counts;
    const countFacts = [
      ['Queued', 'Queued', c.Queued], ['InFlight', 'Being sent', c.InFlight],
      ['Sent', 'Sent', c.Sent], ['Failed', 'Failed', c.Failed],
      ['DeletedBeforeSent', 'Deleted from Orthanc before it was sent', c.DeletedBeforeSent],
      ['Retries', 'Retries', c.Retries],
      ['InstancesPerSecond', 'Instances per second (last minute)',
        status.Throughput.InstancesPerSecond]];
    const rules = status.SwitchingAlbums;
    swap(counts, [countFacts, rules], () => {
      const items = facts(countFacts);
      if (rules) {
        items.push(h('dt', {}, 'Switching rules'), h('dd', { 'data-fact': 'Rules' },
          h('a', { href: '#rules' }, plural(rules.Rules, 'rule') + ' (' + rules.Enabled +
            ' enabled' + (rules.Failing.length ? ', failing: ' + rules.Failing.join(', ') : '') +
            ')'), ': ' + rules.Shares.Shared + ' shared, ' + rules.Shares.Pending +
            ' pending, ' + rules.Shares.Failed + ' failed'));
      }
      return items;
    });
    setText(failedTitle, 'Failed instances (' + queue.Total + ')');
    retryAll.hidden = c.Failed === 0;
    swap(failedList, queue.Instances, () => queue.Instances.length
      ? queue.Instances.map(failedItem)
      : h('li', {}, 'None: nothing needs your attention.'));
  }

  function failedItem(entry) {
    const name = entry.SOPInstanceUID || entry.ID;
    return h('li', { 'data-instance': entry.ID },
      h('div', {},
        h('strong', { class: 'mono' }, name),
        h('p', { class: 'reason' }, entry.LastError || 'no reason recorded'),
        h('p', { class: 'muted' },
          'Failed at ' + when(entry.DoneAt) + ' after ' + plural(entry.Attempts, 'attempt')),
        h('a', { class: 'open-series', href: '#instance/' + encodeURIComponent(entry.ID),
          'aria-label': 'Open its series (instance ' + name + ')' }, 'Open its series')),
      h('button', { type: 'button', class: 'retry-one', 'data-focus': 'retry-' + entry.ID,
        'aria-label': 'Retry instance ' + name, onclick: () => retry([entry.ID]) }, 'Retry'));
  }

  async function retry(ids) {
    try {
      const answer = await api('POST', 'queue/retry', ids ? { Instances: ids } : {});
      note(retryNote, plural(answer.Retried, 'instance') + ' queued again.', 'ok');
    } catch (error) {
      note(retryNote, error.message, 'bad');
    }
    await load().catch(() => {});
  }

  refreshing(load);
}

// -- switching rules: list, form, dry run ---------------------------------------------------

function dryRunResult(result, seriesById) {
  const rows = result.Series.map((verdict) => {
    const known = seriesById[verdict.ID] || {};
    const name = [known.SeriesNumber, known.Modality, known.SeriesDescription]
      .filter(Boolean).join(' · ') || verdict.SeriesInstanceUID || verdict.ID;
    const values = Object.entries(verdict.Values).map(([tag, value]) =>
      h('div', {}, tag + ' = ' + (value === null ? '(absent)' : "'" + value + "'")));
    if (verdict.Error) { values.push(h('div', { class: 'error' }, verdict.Error)); }
    if (!verdict.InstancesRead) { values.push(h('div', {}, 'no instance could be read')); }
    return h('tr', { 'data-series': verdict.ID }, h('td', {}, name),
      h('td', { class: verdict.Matches ? 'match' : 'miss' }, verdict.Matches ? 'yes' : 'no'),
      h('td', {}, values));
  });
  return [
    h('p', {}, result.Matched + ' of ' + plural(result.Series.length, 'series') + ' match' +
      (result.Tags.length ? '; tags read: ' + result.Tags.join(', ') : '') + '.'),
    h('table', {}, h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Series'),
      h('th', { scope: 'col' }, 'Matches'), h('th', { scope: 'col' }, 'Values read'))),
    h('tbody', {}, rows))];
}

async function tryCondition(condition, study, output, form, general) {
  output.replaceChildren();
  clearErrors(form);
  try {
    const [result, resource] = await Promise.all([
      api('POST', 'rules/test', { Condition: condition, Resources: [study] }),
      api('GET', 'resources/studies/' + encodeURIComponent(study))]);
    const seriesById = Object.fromEntries((resource.Series || []).map((s) => [s.ID, s]));
    output.replaceChildren(...dryRunResult(result, seriesById));
  } catch (error) {
    showError(form, error, general);
  }
}

function rulesView() {
  const rulesNote = h('p', { class: 'note', id: 'rules-note', role: 'status' });
  const list = h('div', { id: 'rule-list' });
  let editing = null;

  const name = h('input', { type: 'text', id: 'rule-name', name: 'Name', autocomplete: 'off',
    required: true });
  const destination = h('input', { type: 'password', id: 'rule-destination',
    name: 'DestinationToken', autocomplete: 'new-password' });
  const source = h('input', { type: 'password', id: 'rule-source', name: 'SourceToken',
    autocomplete: 'new-password' });
  const condition = h('textarea', { id: 'rule-condition', name: 'Condition', spellcheck: 'false' });
  const enabled = h('input', { type: 'checkbox', id: 'rule-enabled', name: 'Enabled',
    checked: true });
  const formTitle = h('h2', { id: 'form-title' }, 'New rule');
  const formError = h('p', { class: 'error', id: 'form-error', role: 'alert' });
  const save = h('button', { type: 'submit', class: 'primary', id: 'rule-save' }, 'Create');
  const destinationHint = h('span', {}, 'album token of the destination, with write');
  const sourceHint = h('span', {}, 'optional; default: Kheops.Token');
  const form = h('form', { class: 'card', id: 'rule-form', 'aria-labelledby': 'form-title',
    novalidate: true },
    formTitle,
    field('Name', 'Name', name, 'letters, digits, . _ -'),
    field('DestinationToken', 'Destination token', destination, destinationHint),
    field('SourceToken', 'Source token', source, sourceHint),
    field('Condition', 'Condition', condition, 'empty: every series'),
    h('div', { class: 'field', 'data-field': 'Enabled' }, enabled,
      h('label', { for: 'rule-enabled', class: 'inline' }, 'Enabled')),
    formError,
    h('div', { class: 'actions' }, save,
      h('button', { type: 'button', id: 'rule-cancel', onclick: resetForm }, 'Cancel'),
      h('button', { type: 'button', id: 'rule-try', onclick: () => {
        tryText.value = condition.value;
        runDryRun();
      } }, 'Try this condition')));

  const tryText = h('textarea', { id: 'try-condition', name: 'Condition', spellcheck: 'false',
    placeholder: "tagValueIsPresent(#Tag.Modality, 'CT')" });
  const tryStudy = h('select', { id: 'try-study', name: 'Study' },
    h('option', { value: '' }, 'Choose a study…'));
  const tryError = h('p', { class: 'error', id: 'try-error', role: 'alert' });
  const tryResult = h('div', { id: 'try-result', 'aria-live': 'polite' });
  const dryRun = h('form', { class: 'card', id: 'dry-run', 'aria-labelledby': 'dry-run-title',
    novalidate: true },
    h('h2', { id: 'dry-run-title' }, 'Try a condition on a study'),
    field('Condition', 'Condition', tryText),
    field('Resources', 'Study', tryStudy),
    tryError,
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary',
      id: 'try-run' }, 'Test')),
    tryResult);

  view.replaceChildren(h('h1', {}, 'Switching rules'), h('div', { class: 'wide-narrow' },
    h('section', { 'aria-label': 'Rules' }, rulesNote, list),
    h('div', {}, form, dryRun)));

  function resetForm() {
    editing = null;
    form.reset();
    clearErrors(form);
    setText(formTitle, 'New rule');
    name.disabled = false;
    destinationHint.textContent = 'album token of the destination, with write';
    sourceHint.textContent = 'optional; default: Kheops.Token';
    enabled.checked = true;
    save.textContent = 'Create';
  }

  function editRule(rule) {
    resetForm();
    editing = rule;
    setText(formTitle, 'Edit rule ' + rule.Name);
    name.value = rule.Name;
    name.disabled = true;  // a rule cannot be renamed
    destinationHint.textContent = 'leave empty to keep the current token (' +
      rule.DestinationToken + ')';
    sourceHint.textContent = 'leave empty to keep the current token (' +
      (rule.SourceIsMainToken ? 'Kheops.Token' : rule.SourceToken) + ')';
    condition.value = rule.Condition;
    enabled.checked = rule.Enabled;
    save.textContent = 'Save';
    condition.focus();
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    clearErrors(form);
    const body = { Condition: condition.value, Enabled: enabled.checked };
    if (destination.value || !editing) { body.DestinationToken = destination.value; }
    if (source.value) { body.SourceToken = source.value; }
    const done = editing ? 'Rule ' + editing.Name + ' saved.' : 'Rule ' + name.value + ' created.';
    try {
      if (editing) {
        await api('PUT', 'rules/' + encodeURIComponent(editing.Name), body);
      } else {
        body.Name = name.value;
        await api('POST', 'rules', body);
      }
      resetForm();
      note(rulesNote, done, 'ok');
      await loadRules();
    } catch (error) {
      showError(form, error, formError);
    }
  });

  async function change(rule, method, path, body, done) {
    try {
      await api(method, path, body);
      if (editing && editing.Name === rule.Name && method === 'DELETE') { resetForm(); }
      note(rulesNote, done, 'ok');
    } catch (error) {
      note(rulesNote, error.message, 'bad');
    }
    await loadRules().catch(() => {});
  }

  function ruleCard(rule) {
    const path = 'rules/' + encodeURIComponent(rule.Name);
    const card = h('section', { class: 'card rule', 'data-rule': rule.Name,
      'aria-label': 'Rule ' + rule.Name },
      h('h3', {}, rule.Name,
        h('span', { class: 'badge' }, rule.ReadOnly ? 'configuration, read-only' : 'REST'),
        h('span', { class: 'badge ' + rule.State, 'data-state': rule.State }, rule.State)),
      h('p', {}, 'Destination album ', h('strong', {}, rule.DestinationAlbumId || 'unknown'),
        ' (token ' + rule.DestinationToken + '), source token ' + rule.SourceToken +
        (rule.SourceIsMainToken ? ' (Kheops.Token)' : '')),
      h('p', { class: 'condition mono' }, rule.Condition || '(empty: every series)'),
      h('p', { class: 'counters' }, plural(rule.Counts.SeriesMatched, 'series') + ' matched: ' +
        rule.Counts.Shared + ' shared, ' + rule.Counts.Pending + ' pending, ' +
        rule.Counts.Failed + ' failed'),
      rule.StateDetail ? h('p', { class: 'error' }, rule.StateDetail)
        : rule.LastError ? h('p', {}, 'Last error (' + when(rule.LastErrorAt) + '): ' +
          rule.LastError) : null);
    if (rule.ReadOnly) {
      card.append(h('p', {}, h('em', {},
        'Defined in Kheops.SwitchingAlbums: change it in the configuration file.')));
      return card;
    }
    card.append(h('div', { class: 'actions' },
      h('button', { type: 'button', class: 'edit', 'data-focus': 'edit-' + rule.Name,
        'aria-label': 'Edit rule ' + rule.Name, onclick: () => editRule(rule) }, 'Edit'),
      h('button', { type: 'button', class: 'toggle', 'data-focus': 'toggle-' + rule.Name,
        'aria-label': (rule.Enabled ? 'Disable' : 'Enable') + ' rule ' + rule.Name,
        onclick: () => change(rule, 'PUT', path, { Enabled: !rule.Enabled },
          'Rule ' + rule.Name + (rule.Enabled ? ' disabled.' : ' enabled.')) },
        rule.Enabled ? 'Disable' : 'Enable'),
      h('button', { type: 'button', class: 'delete danger', 'data-focus': 'delete-' + rule.Name,
        'aria-label': 'Delete rule ' + rule.Name, onclick: () => {
          if (window.confirm('Delete rule ' + rule.Name + '? Its pending shares are dropped.')) {
            change(rule, 'DELETE', path, undefined, 'Rule ' + rule.Name + ' deleted.');
          }
        } }, 'Delete')));
    return card;
  }

  async function loadRules() {
    const rules = await read('rules');
    swap(list, rules, () => rules.length ? rules.map(ruleCard)
      : h('p', {}, 'No switching rule yet: create one with the form.'));
  }

  function runDryRun() {
    clearErrors(dryRun);
    if (!tryStudy.value) {
      tryResult.replaceChildren();
      showError(dryRun, { field: 'Resources', message: 'Choose a study first.' }, tryError);
      return;
    }
    tryCondition(tryText.value, tryStudy.value, tryResult, dryRun, tryError);
  }
  dryRun.addEventListener('submit', (event) => { event.preventDefault(); runDryRun(); });

  read('resources/studies').then((answer) => {
    tryStudy.append(...answer.Studies.map((study) => h('option', { value: study.ID },
      (study.PatientName || study.PatientID || '?') + ' — ' +
      (study.StudyDescription || 'no description') + ' (' + (study.StudyDate || 'no date') +
      ', ' + plural(study.Series, 'series') + ')')));
  }).catch(() => {});
  refreshing(loadRules);  // the counters move as series are shared
}

// -- studies: the ones received last --------------------------------------------------------

function studiesView() {
  const table = h('tbody', { id: 'studies' });
  view.replaceChildren(h('h1', {}, 'Studies received last'),
    h('section', { class: 'card' }, h('table', {},
      h('thead', {}, h('tr', {}, ...['Patient', 'Description', 'Date', 'Series']
        .map((title) => h('th', { scope: 'col' }, title)))), table)));
  refreshing(async () => {
    const answer = await read('resources/studies');
    swap(table, answer.Studies, () => answer.Studies.length ? answer.Studies.map((study) =>
      h('tr', { 'data-study': study.ID },
        h('td', {}, h('a', { href: '#study/' + study.ID, 'data-focus': 'study-' + study.ID },
          (study.PatientName || '?') + ' (' + (study.PatientID || 'no id') + ')')),
        h('td', {}, study.StudyDescription || 'no description'),
        h('td', {}, study.StudyDate || ''), h('td', {}, String(study.Series))))
      : h('tr', {}, h('td', { colspan: 4 }, 'Orthanc holds no study.')));
  });
}

// -- a study or a series: what became of its instances, and what to do ---------------------

function resourceView(level) {
  return (id) => {
    const isStudy = level === 'studies';
    const title = h('h1', {}, (isStudy ? 'Study ' : 'Series ') + id);
    const summary = h('h2', { id: 'resource-summary' }, 'Reading…');
    const reasons = h('div', { id: 'resource-reasons' });
    const state = h('section', { class: 'card state', id: 'resource-state',
      'aria-label': 'KHEOPS state' }, summary, reasons);
    const parent = h('p', { id: 'resource-parent' });
    const seriesRows = h('tbody', { id: 'series-rows' });
    const resourceNote = h('p', { class: 'note', id: 'resource-note', role: 'status' });
    const retryButton = h('button', { type: 'button', id: 'retry-resource', hidden: true,
      onclick: retryFailed }, 'Retry the failed instances');
    const shareRule = h('select', { id: 'share-rule', name: 'Rule' });
    const shareButton = h('button', { type: 'button', id: 'share-apply', onclick: share },
      'Share');
    let failed = [];

    const tryText = h('textarea', { id: 'study-try-condition', name: 'Condition',
      spellcheck: 'false', placeholder: "tagValueIsPresent(#Tag.Modality, 'CT')" });
    const tryError = h('p', { class: 'error', id: 'study-try-error', role: 'alert' });
    const tryResult = h('div', { id: 'study-try-result', 'aria-live': 'polite' });
    const tryForm = h('form', { class: 'card', id: 'study-try', novalidate: true,
      'aria-labelledby': 'study-try-title' },
      h('h2', { id: 'study-try-title' }, 'Try a condition on this study'),
      field('Condition', 'Condition', tryText), tryError,
      h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary',
        id: 'study-try-run' }, 'Test')),
      tryResult);
    tryForm.addEventListener('submit', (event) => {
      event.preventDefault();
      tryCondition(tryText.value, id, tryResult, tryForm, tryError);
    });

    view.replaceChildren(title, parent, state,
      isStudy ? h('section', { class: 'card', 'aria-labelledby': 'series-title' },
        h('h2', { id: 'series-title' }, 'Series'),
        h('table', {}, h('thead', {}, h('tr', {}, ...['Series', 'KHEOPS', 'Instances']
          .map((text) => h('th', { scope: 'col' }, text)))), seriesRows)) : null,
      h('section', { class: 'card', 'aria-labelledby': 'actions-title' },
        h('h2', { id: 'actions-title' }, 'Actions'), resourceNote,
        h('div', { class: 'actions' },
          h('button', { type: 'button', class: 'primary', id: 'send', onclick: send },
            'Send to KHEOPS'), retryButton),
        h('div', { class: 'actions' },
          h('label', { for: 'share-rule' }, 'Share into'), shareRule, shareButton)),
      isStudy ? tryForm : null);

    fetch('../../' + level + '/' + encodeURIComponent(id), { headers: { Accept: 'application/json' } })
      .then((response) => response.ok ? response.json() : null)
      .then((document_) => {
        if (!document_) { return; }
        const tags = document_.MainDicomTags || {};
        const patient = document_.PatientMainDicomTags || {};
        setText(title, isStudy
          ? 'Study: ' + (patient.PatientName || '?') + ' — ' +
            (tags.StudyDescription || 'no description') + ' (' + (tags.StudyDate || 'no date') + ')'
          : 'Series: ' + [tags.SeriesNumber, tags.Modality, tags.SeriesDescription]
            .filter(Boolean).join(' · '));
      }).catch(() => {});

    async function load() {
      const resource = await read('resources/' + level + '/' + encodeURIComponent(id));
      const words = RESOURCE_STATES[resource.State];
      state.className = 'card state tone-' + words.tone;
      state.dataset.state = resource.State;
      setText(summary, words.text + ': ' + describeCounts(resource.Counts));
      const unique = [...new Set(resource.Failures.map((f) => f.LastError))];
      swap(reasons, unique, () => unique.map((reason) => h('p', { class: 'reason' }, reason)));
      failed = resource.Failures.map((f) => f.ID);
      retryButton.hidden = failed.length === 0;
      if (!isStudy && resource.StudyID) {
        swap(parent, resource.StudyID, () => ['Part of ',
          h('a', { href: '#study/' + resource.StudyID }, 'study ' + resource.StudyID), '.']);
      }
      if (isStudy) {
        swap(seriesRows, resource.Series, () => resource.Series.map((series) =>
          h('tr', { 'data-series': series.ID },
            h('td', {}, h('a', { href: '#series/' + series.ID, 'data-focus': 'series-' + series.ID },
              [series.SeriesNumber, series.Modality, series.SeriesDescription]
                .filter(Boolean).join(' · ') || series.ID)),
            h('td', { class: 'series-state' }, RESOURCE_STATES[series.State].text + ': ' +
              describeCounts(series.Counts)),
            h('td', {}, String(series.Instances)))));
      }
    }

    async function loadRules() {
      const rules = (await read('rules')).filter((rule) => rule.Enabled);
      swap(shareRule, rules, () => rules.length
        ? rules.map((rule) => h('option', { value: rule.Name },
          rule.Name + ' → album ' + (rule.DestinationAlbumId || '?')))
        : h('option', { value: '' }, 'no enabled switching rule'));
      shareButton.disabled = rules.length === 0;
    }

    async function act(request, words) {
      try {
        note(resourceNote, words(await request), 'ok');
      } catch (error) {
        note(resourceNote, error.message, 'bad');
      }
      await load().catch(() => {});
    }

    function send() {
      act(api('POST', 'send', { Resources: [id] }),
        (answer) => plural(answer.Queued, 'instance') + ' queued for KHEOPS.');
    }

    function retryFailed() {
      act(api('POST', 'queue/retry', { Instances: failed }),
        (answer) => plural(answer.Retried, 'instance') + ' queued again.');
    }

    function share() {
      const rule = shareRule.value;
      act(api('POST', 'rules/' + encodeURIComponent(rule) + '/apply', { Resources: [id] }),
        (answer) => 'Rule ' + answer.Rule + ': ' + answer.Matched + ' of ' +
          plural(answer.Series, 'series') + ' match, ' + answer.Queued + ' queued for sharing.' +
          (answer.NotInMainAlbum ? ' ' + plural(answer.NotInMainAlbum, 'series') +
            ' not in the main album yet: send them to KHEOPS first.' : ''));
    }

    refreshing(async () => { await Promise.all([load(), loadRules()]); });
  };
}

// -- an instance: its series, found in Orthanc ------------------------------------------------

function instanceView(id) {
  const title = h('h1', {}, 'Instance ' + id);
  const status = h('p', { id: 'instance-status', role: 'status' }, 'Finding its series…');
  view.replaceChildren(title, status);
  const mine = generation;
  orthanc('instances/' + encodeURIComponent(id)).then((found) => {
    if (mine === generation) {
      location.replace('#series/' + encodeURIComponent(found.ParentSeries));
    }
  }).catch((error) => {
    setText(status, error.status === 404 ? 'Orthanc no longer has this instance.'
      : 'Cannot read the instance from Orthanc: ' + error.message);
  });
}

// -- routes: #status, #rules, #studies, #study/{id}, #series/{id}, #instance/{id} ---------

const VIEWS = {
  status: statusView, rules: rulesView, studies: studiesView,
  study: resourceView('studies'), series: resourceView('series'), instance: instanceView,
};
const WITH_ID = ['study', 'series', 'instance'];

function route(moved) {
  const [name, ...rest] = location.hash.replace(/^#/, '').split('/');
  const known = name in VIEWS && (rest.length > 0) === WITH_ID.includes(name);
  const shown = known ? name : 'status';
  generation += 1;
  clearTimeout(timer);
  const section = WITH_ID.includes(shown) ? 'studies' : shown;
  document.querySelectorAll('[data-nav]').forEach((link) => {
    if (link.dataset.nav === section) { link.setAttribute('aria-current', 'page'); }
    else { link.removeAttribute('aria-current'); }
  });
  VIEWS[shown](decodeURIComponent(rest.join('/')));
  document.title = view.querySelector('h1').textContent + ' · KHEOPS';
  if (moved) { view.focus(); }
}

window.addEventListener('hashchange', () => route(true));
route(false);
