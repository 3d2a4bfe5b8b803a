// KHEOPS in Orthanc Explorer: a status page, a rules page, and a box on study and series pages.
//
// Orthanc appends this file to its explorer.js (ExtendOrthancExplorer). Explorer is jQuery 1.7
// and jQuery Mobile 1.1: pages are <div data-role="page"> reached by their #hash. This file only
// talks to the plugin's /kheops/... routes, which never answer a token in clear; text coming from
// the server always goes through .text(), never into HTML.
(function () {
  'use strict';

  var REFRESH_MS = 3000;
  var timer = null;

  // -- talking to the plugin ----------------------------------------------------------------

  function api(method, path, body) {
    // Relative to /app/explorer.html, so that it works behind a reverse proxy too; jQuery adds
    // the ?token= headers Explorer set up in $.ajaxSetup, the browser the Basic credentials.
    var settings = { url: '../kheops/' + path, type: method, dataType: 'json', cache: false };
    if (body !== undefined) {
      settings.contentType = 'application/json';
      settings.data = JSON.stringify(body);
    }
    return $.ajax(settings);
  }

  function failure(xhr) {
    // The plugin answers errors as {"HttpStatus", "Message", "Field"}.
    try {
      var answer = JSON.parse(xhr.responseText);
      if (answer && answer.Message) {
        return { message: answer.Message, field: answer.Field || '' };
      }
    } catch (ignored) { /* not JSON: say what HTTP said */ }
    return { message: 'HTTP ' + xhr.status + ' ' + (xhr.statusText || ''), field: '' };
  }

  // -- small formatting helpers -------------------------------------------------------------

  function when(iso) {
    if (!iso) { return 'never'; }
    var date = new Date(iso);
    var time = date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    if (date.toDateString() === new Date().toDateString()) { return time; }
    return date.toLocaleDateString() + ' ' + time;
  }

  function plural(count, word) {
    return count + ' ' + word + (count === 1 || word === 'series' ? '' : 's');
  }

  // The state in plain words: what an administrator needs to read first.
  function stateInWords(status) {
    var detail = (status.StateDetail || '').replace(/^Paused: /, '');
    if (!status.Enabled) {
      return { tone: 'off', text: 'Not sending: forwarding is disabled (Kheops.Enabled is false)',
               detail: 'Instances are queued and will be sent once it is enabled.' };
    }
    if (status.State === 'paused') {
      var code = /answered (\d{3})/.exec(detail);
      return { tone: 'bad',
               detail: detail + '. Nothing is lost: instances stay queued, and sending resumes' +
                       ' by itself once KHEOPS accepts the token again.',
               text: 'Paused: KHEOPS refuses the token' + (code ? ' (' + code[1] + ')' : '') +
                     ' since ' + when(status.Since) };
    }
    if (status.State === 'unreachable') {
      return { tone: 'warn', detail: detail,
               text: 'KHEOPS unreachable since ' + when(status.Since) + ', retrying' };
    }
    var queued = status.Counts.Queued + status.Counts.InFlight;
    var last = status.LastError ?
      'Last error, at ' + when(status.LastErrorAt) + ': ' + status.LastError : '';
    return { tone: 'ok', detail: last,
             text: queued ? 'Sending: ' + plural(queued, 'instance') + ' to go' : 'Sending' };
  }

  function showState(target, status) {
    var words = stateInWords(status);
    target.removeClass('kheops-ok kheops-warn kheops-bad kheops-off')
      .addClass('kheops-' + words.tone);
    target.find('.kheops-state-text').text(words.text);
    target.find('.kheops-state-detail').text(words.detail);
  }

  function item(label, value, key) {
    return $('<li>').attr('data-count', key).append($('<span>').text(label))
      .append($('<span>').addClass('ui-li-count').text(String(value)));
  }

  function note(target, text, tone) {
    target.removeClass('kheops-ok kheops-bad').addClass(tone ? 'kheops-' + tone : '')
      .text(text).toggle(Boolean(text));
  }

  // -- the pages this file adds ---------------------------------------------------------------

  var HEADER_LEFT =
    '<div data-type="horizontal" data-role="controlgroup" class="ui-btn-left">' +
    '<a href="#lookup" data-icon="arrow-r" data-role="button" data-direction="reverse">Lookup</a>' +
    '<a href="#plugins" data-icon="grid" data-role="button" data-direction="reverse">Plugins</a>' +
    '</div>';

  var PAGES = {
    'kheops':
      '<div data-role="page" id="kheops"><div data-role="header">' +
      '<h1><span class="orthanc-name"></span>KHEOPS</h1>' + HEADER_LEFT +
      '<div data-type="horizontal" data-role="controlgroup" class="ui-btn-right">' +
      '<a href="#kheops-rules" data-icon="gear" data-role="button">Switching rules</a></div>' +
      '</div><div data-role="content">' +
      '<div class="kheops-state" id="kheops-state"><h2 class="kheops-state-text">Loading…</h2>' +
      '<p class="kheops-state-detail"></p></div>' +
      '<div class="ui-grid-a"><div class="ui-block-a"><div class="kheops-column">' +
      '<ul data-role="listview" data-inset="true" id="kheops-connection"></ul></div></div>' +
      '<div class="ui-block-b"><div class="kheops-column">' +
      '<ul data-role="listview" data-inset="true" id="kheops-counts"></ul></div></div></div>' +
      '<ul data-role="listview" data-inset="true" data-split-icon="refresh" data-split-theme="d"' +
      ' id="kheops-failed"></ul>' +
      '<a href="#" data-role="button" data-inline="true" data-icon="refresh" data-theme="b"' +
      ' id="kheops-retry">Retry the failed instances</a>' +
      '<p class="kheops-note" id="kheops-retry-note"></p>' +
      '</div></div>',

    'kheops-rules':
      '<div data-role="page" id="kheops-rules"><div data-role="header">' +
      '<h1><span class="orthanc-name"></span><a href="#kheops">KHEOPS</a> &raquo; Switching rules' +
      '</h1>' + HEADER_LEFT +
      '<div data-type="horizontal" data-role="controlgroup" class="ui-btn-right">' +
      '<a href="#kheops" data-icon="info" data-role="button">KHEOPS status</a></div>' +
      '</div><div data-role="content"><div class="ui-grid-a">' +
      '<div class="ui-block-a kheops-wide"><div class="kheops-column">' +
      '<h3>Rules</h3><p class="kheops-note" id="kheops-rules-note"></p>' +
      '<div id="kheops-rule-list"></div></div></div>' +
      '<div class="ui-block-b kheops-narrow"><div class="kheops-column">' +
      '<form id="kheops-rule-form" class="ui-body ui-body-c kheops-card" data-ajax="false">' +
      '<h3 id="kheops-form-title">New rule</h3>' +
      field('Name', '<input type="text" name="Name" id="kheops-rule-name" autocomplete="off"' +
            ' placeholder="letters, digits, . _ -">') +
      field('DestinationToken', '<input type="password" name="DestinationToken"' +
            ' id="kheops-rule-destination" autocomplete="new-password"' +
            ' placeholder="album token of the destination, with write">', 'Destination token') +
      field('SourceToken', '<input type="password" name="SourceToken" id="kheops-rule-source"' +
            ' autocomplete="new-password" placeholder="optional; default: Kheops.Token">',
            'Source token') +
      field('Condition', '<textarea name="Condition" id="kheops-rule-condition"' +
            ' placeholder="empty: every series"></textarea>') +
      '<div data-role="fieldcontain" class="kheops-field" data-field="Enabled">' +
      '<label for="kheops-rule-enabled">Enabled</label>' +
      '<input type="checkbox" name="Enabled" id="kheops-rule-enabled" checked></div>' +
      '<p class="kheops-error" id="kheops-form-error"></p>' +
      '<button type="submit" data-theme="b" data-inline="true" id="kheops-rule-save">Create</button>' +
      '<button type="button" data-inline="true" id="kheops-rule-cancel">Cancel</button>' +
      '<button type="button" data-inline="true" id="kheops-rule-try">Try this condition</button>' +
      '</form>' +
      '<form id="kheops-dry-run" class="ui-body ui-body-c kheops-card" data-ajax="false">' +
      '<h3>Try a condition on a study</h3>' +
      field('Condition', '<textarea name="Condition" id="kheops-try-condition"' +
            ' placeholder="tagValueIsPresent(#Tag.Modality, \'CT\')"></textarea>') +
      '<div data-role="fieldcontain" class="kheops-field" data-field="Resources">' +
      '<label for="kheops-try-study">Study</label>' +
      '<select name="Study" id="kheops-try-study"></select>' +
      '<p class="kheops-error"></p></div>' +
      '<p class="kheops-error" id="kheops-try-error"></p>' +
      '<button type="submit" data-theme="b" data-inline="true" id="kheops-try-run">Test</button>' +
      '<div id="kheops-try-result"></div>' +
      '</form>' +
      '</div></div></div></div></div>'
  };

  function field(name, input, label) {
    return '<div data-role="fieldcontain" class="kheops-field" data-field="' + name + '">' +
      '<label>' + (label || name) + '</label>' + input + '<p class="kheops-error"></p></div>';
  }

  function ensurePages() {
    $.each(PAGES, function (id, html) {
      if (!document.getElementById(id)) { $('body').append(html); }
    });
    $('#kheops-rule-form label, #kheops-dry-run label').each(function () {
      var input = $(this).parent().find('input, textarea, select').first();
      $(this).attr('for', input.attr('id'));
    });
  }

  // jQuery Mobile looks a #page up when it changes to it, and may do so while the document
  // loads (a bookmarked #kheops): create the pages just before that, and at DOM ready.
  $(document).bind('pagebeforechange', function (event, data) {
    if (typeof data.toPage === 'string' && data.toPage.indexOf('#kheops') !== -1) {
      ensurePages();
    }
  });
  $(ensurePages);

  $('head').append($('<style>').text([
    '.kheops-state { padding: 0.6em 1em; border-radius: 0.6em; margin-bottom: 0.5em;',
    '  border: 1px solid #bbb; }',
    '.kheops-state h2 { margin: 0.2em 0; }',
    '.kheops-state p { margin: 0.2em 0; white-space: normal; }',
    '.kheops-ok { background: #e3f4dc; border-color: #8bbf78; }',
    '.kheops-warn { background: #fff1cc; border-color: #e0b44c; }',
    '.kheops-bad { background: #f9dcdc; border-color: #d27a7a; }',
    '.kheops-off { background: #eee; }',
    '.kheops-column { padding: 0 0.5em; }',
    '.ui-grid-a .kheops-wide { width: 58%; }',
    '.ui-grid-a .kheops-narrow { width: 42%; }',
    '.kheops-error { color: #b00; font-weight: bold; margin: 0.2em 0; white-space: normal; }',
    '.kheops-error:empty { display: none; }',
    '.kheops-note { margin: 0.3em 0; padding: 0.3em 0.6em; border-radius: 0.4em; }',
    '.kheops-note:empty { display: none; }',
    '.kheops-card { margin-bottom: 1em; border-radius: 0.6em; }',
    '.kheops-card h3 { margin-top: 0; }',
    '.kheops-card .ui-field-contain { padding: 0.2em 0; margin: 0.3em 0; }',
    '.kheops-card .ui-field-contain label { float: none; display: block; width: auto; }',
    '.kheops-card .ui-field-contain input.ui-input-text, .kheops-card textarea.ui-input-text,',
    '.kheops-card .ui-field-contain .ui-select { width: 100%; display: block;',
    '  box-sizing: border-box; }',
    '.kheops-card textarea.ui-input-text { font-family: monospace; min-height: 4.5em; }',
    '.kheops-rule h4 { margin: 0 0 0.3em 0; font-size: 1.1em; }',
    '.kheops-rule p { margin: 0.25em 0; white-space: normal; }',
    '.kheops-condition { font-family: monospace; background: #f4f4f4; padding: 0.3em;',
    '  word-break: break-all; }',
    '.kheops-badge { display: inline-block; font-size: 0.75em; font-weight: normal;',
    '  padding: 0.1em 0.5em; margin-left: 0.4em; border-radius: 0.8em; background: #ddd; }',
    '.kheops-badge.active { background: #cde8c3; } .kheops-badge.failing { background: #f3c2c2; }',
    '.kheops-badge.invalid { background: #f3c2c2; } .kheops-badge.disabled { background: #ddd; }',
    '#kheops-failed li p, .kheops-box li p { white-space: normal; }',
    '.kheops-try-table { border-collapse: collapse; width: 100%; margin-top: 0.5em; }',
    '.kheops-try-table td, .kheops-try-table th { border-bottom: 1px solid #ccc;',
    '  padding: 0.3em; text-align: left; vertical-align: top; font-size: 0.9em; }',
    '.kheops-match { color: #2a7d12; font-weight: bold; } .kheops-miss { color: #777; }',
    '.kheops-home { display: block; text-decoration: none; color: inherit; margin: 0 0 1em; }',
    '.kheops-series-badge { font-size: 0.8em; font-weight: normal; margin: 0.4em 0 0; }',
    '.kheops-box .kheops-resource-state { border-left: 0.4em solid #bbb; }',
    '.kheops-box .kheops-resource-state.kheops-ok { border-left-color: #8bbf78; }',
    '.kheops-box .kheops-resource-state.kheops-warn { border-left-color: #e0b44c; }',
    '.kheops-box .kheops-resource-state.kheops-bad { border-left-color: #d27a7a; }'
  ].join('\n')));

  function startRefreshing(load) {
    stopRefreshing();
    load();
    timer = setInterval(load, REFRESH_MS);
  }

  function stopRefreshing() {
    if (timer !== null) { clearInterval(timer); timer = null; }
  }

  $(document).on('pagehide', '#kheops, #kheops-rules', stopRefreshing);

  // -- home page: a button and the state in one line ----------------------------------------

  $(document).on('pagebeforecreate', '#lookup', function () {
    $(this).find('[data-role="header"] .ui-btn-right')
      .append('<a href="#kheops" data-icon="forward" data-role="button" id="kheops-home-button">' +
              'KHEOPS</a>');
    $(this).find('[data-role="content"]').first().prepend(
      '<a href="#kheops" class="kheops-home" id="kheops-home-status">' +
      '<div class="kheops-state"><strong class="kheops-state-text">KHEOPS</strong>' +
      '<span class="kheops-state-detail"></span></div></a>');
  });

  $(document).on('pagebeforeshow', '#lookup', function () {
    api('GET', 'status').done(function (status) {
      var target = $('#kheops-home-status .kheops-state');
      showState(target, status);
      target.find('.kheops-state-text').text('KHEOPS: ' + stateInWords(status).text);
      target.find('.kheops-state-detail').text(
        ' — ' + status.Counts.Sent + ' sent, ' + status.Counts.Queued + ' queued, ' +
        status.Counts.Failed + ' failed');
    });
  });

  // -- the KHEOPS page ----------------------------------------------------------------------

  function loadStatus() {
    api('GET', 'status').done(function (status) {
      showState($('#kheops-state'), status);

      var connection = $('#kheops-connection').empty()
        .append('<li data-role="list-divider">Main album</li>');
      connection.append($('<li>').append($('<p>').text('KHEOPS')).append($('<h3>').text(status.Url)));
      connection.append($('<li>').append($('<p>').text('Token (masked)'))
        .append($('<h3>').text(status.Token)));
      var inactive = status.TokenActive === false;
      connection.append($('<li>').append($('<p>').text('Album'))
        .append($('<h3>').text(status.AlbumId ||
                               (inactive ? 'none: KHEOPS says the token is not active'
                                         : 'unknown yet'))));
      connection.append($('<li>').append($('<p>').text('Permissions'))
        .append($('<h3>').text(status.Permissions ? status.Permissions.join(', ') || 'none'
                                                  : 'unknown yet')));
      connection.append($('<li>').append($('<p>').text('Last instance sent'))
        .append($('<h3>').text(when(status.LastSuccessAt))));
      connection.listview('refresh');

      var counts = $('#kheops-counts').empty()
        .append('<li data-role="list-divider">Instances</li>')
        .append(item('Queued', status.Counts.Queued, 'Queued'))
        .append(item('Being sent', status.Counts.InFlight, 'InFlight'))
        .append(item('Sent', status.Counts.Sent, 'Sent'))
        .append(item('Failed', status.Counts.Failed, 'Failed'))
        .append(item('Retries', status.Counts.Retries, 'Retries'))
        .append(item('Instances per second (last minute)', status.Throughput.InstancesPerSecond,
                     'InstancesPerSecond'));
      var rules = status.SwitchingAlbums;
      if (rules) {
        var link = $('<a href="#kheops-rules">').text(
          plural(rules.Rules, 'switching rule') + ' (' + rules.Enabled + ' enabled' +
          (rules.Failing.length ? ', failing: ' + rules.Failing.join(', ') : '') + ')');
        link.append($('<span>').addClass('ui-li-count').text(
          rules.Shares.Shared + ' shared, ' + rules.Shares.Pending + ' pending, ' +
          rules.Shares.Failed + ' failed'));
        counts.append('<li data-role="list-divider">Switching albums</li>')
          .append($('<li>').append(link));
      }
      counts.listview('refresh');
      $('#kheops-retry').toggle(status.Counts.Failed > 0);
    }).fail(function (xhr) {
      $('#kheops-state').find('.kheops-state-text').text('Cannot read the status')
        .end().find('.kheops-state-detail').text(failure(xhr).message);
    });

    api('GET', 'queue?state=failed&limit=100').done(function (queue) {
      var list = $('#kheops-failed').empty()
        .append($('<li data-role="list-divider">').text('Failed instances (' + queue.Total + ')'));
      if (!queue.Instances.length) {
        list.append($('<li>').text('None: nothing needs your attention.'));
      }
      $.each(queue.Instances, function (_, entry) {
        var main = $('<a>').attr('href', '#instance?uuid=' + entry.ID)
          .append($('<h3>').text(entry.SOPInstanceUID || entry.ID))
          .append($('<p>').addClass('kheops-error').text(entry.LastError || 'no reason recorded'))
          .append($('<p>').text('Failed at ' + when(entry.DoneAt) + ' after ' +
                                plural(entry.Attempts, 'attempt')));
        var retry = $('<a href="#" class="kheops-retry-one">').attr('data-id', entry.ID)
          .text('Retry this instance');
        list.append($('<li>').append(main).append(retry));
      });
      list.listview('refresh');
    });
  }

  $(document).on('pagebeforeshow', '#kheops', function () {
    note($('#kheops-retry-note'), '');
    startRefreshing(loadStatus);
  });

  function retry(ids) {
    api('POST', 'queue/retry', ids ? { Instances: ids } : {}).done(function (answer) {
      note($('#kheops-retry-note'), plural(answer.Retried, 'instance') + ' queued again.', 'ok');
      loadStatus();
    }).fail(function (xhr) {
      note($('#kheops-retry-note'), failure(xhr).message, 'bad');
    });
  }

  $(document).on('click', '#kheops-retry', function (event) {
    event.preventDefault();
    retry(null);
  });

  $(document).on('click', '.kheops-retry-one', function (event) {
    event.preventDefault();
    retry([$(this).attr('data-id')]);
  });

  // -- the rules page -----------------------------------------------------------------------

  var editing = null;  // the rule being edited, or null when the form creates one

  function ruleCard(rule) {
    var card = $('<div class="ui-body ui-body-c kheops-card kheops-rule">')
      .attr('data-rule', rule.Name);
    var title = $('<h4>').text(rule.Name)
      .append($('<span class="kheops-badge">').text(
        rule.ReadOnly ? 'configuration, read-only' : 'REST'))
      .append($('<span class="kheops-badge">').addClass(rule.State).text(rule.State));
    card.append(title);
    card.append($('<p>').text('Destination album ')
      .append($('<strong>').text(rule.DestinationAlbumId || 'unknown'))
      .append(document.createTextNode(' (token ' + rule.DestinationToken + '), source token ' +
        rule.SourceToken + (rule.SourceIsMainToken ? ' (Kheops.Token)' : ''))));
    card.append($('<p class="kheops-condition">').text(rule.Condition || '(empty: every series)'));
    card.append($('<p class="kheops-counters">').text(
      plural(rule.Counts.SeriesMatched, 'series') + ' matched: ' + rule.Counts.Shared +
      ' shared, ' + rule.Counts.Pending + ' pending, ' + rule.Counts.Failed + ' failed'));
    if (rule.StateDetail) {
      card.append($('<p class="kheops-error">').text(rule.StateDetail));
    } else if (rule.LastError) {
      card.append($('<p>').text('Last error (' + when(rule.LastErrorAt) + '): ' + rule.LastError));
    }
    if (rule.ReadOnly) {
      card.append($('<p>').append($('<em>').text(
        'Defined in Kheops.SwitchingAlbums: change it in the configuration file.')));
    } else {
      card.append(
        $('<a href="#" data-role="button" data-inline="true" data-mini="true" data-icon="gear"' +
          ' class="kheops-edit">Edit</a>'),
        $('<a href="#" data-role="button" data-inline="true" data-mini="true"' +
          ' class="kheops-toggle">').text(rule.Enabled ? 'Disable' : 'Enable'),
        $('<a href="#" data-role="button" data-inline="true" data-mini="true" data-icon="delete"' +
          ' class="kheops-delete">Delete</a>'));
    }
    card.data('rule', rule);
    return card;
  }

  var shownRules = '';

  function loadRules() {
    return api('GET', 'rules').done(function (rules) {
      var seen = JSON.stringify(rules);
      if (seen === shownRules) { return; }  // redraw only what changed: no flicker every 3 s
      shownRules = seen;
      var list = $('#kheops-rule-list').empty();
      if (!rules.length) {
        list.append($('<p>').text('No switching rule yet: create one with the form.'));
      }
      $.each(rules, function (_, rule) { list.append(ruleCard(rule)); });
      list.trigger('create');
    }).fail(function (xhr) {
      note($('#kheops-rules-note'), failure(xhr).message, 'bad');
    });
  }

  function loadStudies() {
    var select = $('#kheops-try-study');
    var wanted = ($.mobile.pageData && $.mobile.pageData.study) || select.val();
    api('GET', 'resources/studies').done(function (answer) {
      select.empty().append($('<option value="">').text('Choose a study…'));
      $.each(answer.Studies, function (_, study) {
        select.append($('<option>').attr('value', study.ID).text(
          (study.PatientName || study.PatientID || '?') + ' — ' +
          (study.StudyDescription || 'no description') + ' (' + (study.StudyDate || 'no date') +
          ', ' + plural(study.Series, 'series') + ')'));
      });
      if (wanted && !select.find('option[value="' + wanted + '"]').length) {
        select.append($('<option>').attr('value', wanted).text('Study ' + wanted));
      }
      select.val(wanted || '').selectmenu('refresh', true);
    });
  }

  function clearErrors(form) {
    form.find('.kheops-error').text('');
  }

  function showError(form, problem, general) {
    // Next to the field the server named, else above the buttons.
    var slot = problem.field ?
      form.find('.kheops-field[data-field="' + problem.field + '"] .kheops-error') : $();
    (slot.length ? slot : general).text(problem.message);
  }

  function nameEditable(editable) {
    // A rule cannot be renamed; jQuery Mobile greys the field out as well.
    $('#kheops-rule-name').prop('disabled', !editable).textinput(editable ? 'enable' : 'disable');
  }

  function saveLabel(text) {
    // jQuery Mobile shows a <button> through a span next to it, in the same wrapper.
    $('#kheops-rule-save').text(text).closest('.ui-btn').find('.ui-btn-text').text(text);
  }

  function resetForm() {
    var form = $('#kheops-rule-form');
    editing = null;
    form[0].reset();
    clearErrors(form);
    $('#kheops-form-title').text('New rule');
    nameEditable(true);
    $('#kheops-rule-destination').attr('placeholder', 'album token of the destination, with write');
    $('#kheops-rule-source').attr('placeholder', 'optional; default: Kheops.Token');
    $('#kheops-rule-enabled').prop('checked', true).checkboxradio('refresh');
    saveLabel('Create');
  }

  function editRule(rule) {
    resetForm();
    editing = rule;
    $('#kheops-form-title').text('Edit rule ' + rule.Name);
    $('#kheops-rule-name').val(rule.Name);
    nameEditable(false);
    $('#kheops-rule-destination').attr('placeholder', 'unchanged (' + rule.DestinationToken + ')');
    $('#kheops-rule-source').attr('placeholder', rule.SourceIsMainToken ?
      'unchanged (Kheops.Token)' : 'unchanged (' + rule.SourceToken + ')');
    $('#kheops-rule-condition').val(rule.Condition);
    $('#kheops-rule-enabled').prop('checked', rule.Enabled).checkboxradio('refresh');
    saveLabel('Save');
  }

  function ruleOfButton(button) {
    return $(button).closest('.kheops-rule').data('rule');
  }

  $(document).on('pagebeforeshow', '#kheops-rules', function () {
    note($('#kheops-rules-note'), '');
    shownRules = '';
    startRefreshing(loadRules);  // the counters move as series are shared
    loadStudies();
  });

  $(document).on('submit', '#kheops-rule-form', function (event) {
    event.preventDefault();
    var form = $(this);
    clearErrors(form);
    var body = {
      Condition: $('#kheops-rule-condition').val(),
      Enabled: $('#kheops-rule-enabled').prop('checked')
    };
    var destination = $('#kheops-rule-destination').val();
    var source = $('#kheops-rule-source').val();
    if (destination || !editing) { body.DestinationToken = destination; }
    if (source) { body.SourceToken = source; }
    var request;
    if (editing) {
      request = api('PUT', 'rules/' + encodeURIComponent(editing.Name), body);
    } else {
      body.Name = $('#kheops-rule-name').val();
      request = api('POST', 'rules', body);
    }
    var saved = editing ? 'Rule ' + editing.Name + ' saved.' : 'Rule ' + body.Name + ' created.';
    request.done(function () {
      resetForm();
      note($('#kheops-rules-note'), saved, 'ok');
      loadRules();
    }).fail(function (xhr) {
      showError(form, failure(xhr), $('#kheops-form-error'));
    });
  });

  $(document).on('click', '#kheops-rule-cancel', function () {
    resetForm();
  });

  $(document).on('click', '.kheops-edit', function (event) {
    event.preventDefault();
    editRule(ruleOfButton(this));
    $('#kheops-rule-condition').focus();
  });

  $(document).on('click', '.kheops-toggle', function (event) {
    event.preventDefault();
    var rule = ruleOfButton(this);
    api('PUT', 'rules/' + encodeURIComponent(rule.Name), { Enabled: !rule.Enabled })
      .done(function () {
        note($('#kheops-rules-note'),
             'Rule ' + rule.Name + (rule.Enabled ? ' disabled.' : ' enabled.'), 'ok');
        loadRules();
      }).fail(function (xhr) {
        note($('#kheops-rules-note'), failure(xhr).message, 'bad');
      });
  });

  $(document).on('click', '.kheops-delete', function (event) {
    event.preventDefault();
    var rule = ruleOfButton(this);
    if (!window.confirm('Delete rule ' + rule.Name + '? Its pending shares are dropped.')) {
      return;
    }
    api('DELETE', 'rules/' + encodeURIComponent(rule.Name)).done(function () {
      if (editing && editing.Name === rule.Name) { resetForm(); }
      note($('#kheops-rules-note'), 'Rule ' + rule.Name + ' deleted.', 'ok');
      loadRules();
    }).fail(function (xhr) {
      note($('#kheops-rules-note'), failure(xhr).message, 'bad');
    });
  });

  $(document).on('click', '#kheops-rule-try', function () {
    $('#kheops-try-condition').val($('#kheops-rule-condition').val());
    $('#kheops-dry-run').submit();
  });

  // -- the dry run: which series of a study match, and the values read ---------------------

  function dryRunTable(result, series) {
    var table = $('<table class="kheops-try-table">').append(
      '<tr><th>Series</th><th>Matches</th><th>Values read</th></tr>');
    $.each(result.Series, function (_, verdict) {
      var known = series[verdict.ID] || {};
      var name = [known.SeriesNumber, known.Modality, known.SeriesDescription]
        .filter(Boolean).join(' · ') || verdict.SeriesInstanceUID || verdict.ID;
      var values = $('<td>');
      $.each(verdict.Values, function (tag, value) {
        values.append($('<div>').text(tag + ' = ' + (value === null ? '(absent)' : "'" + value + "'")));
      });
      if (verdict.Error) { values.append($('<div class="kheops-error">').text(verdict.Error)); }
      if (!verdict.InstancesRead) { values.append($('<div>').text('no instance could be read')); }
      table.append($('<tr>').attr('data-series', verdict.ID)
        .append($('<td>').text(name))
        .append($('<td>').addClass(verdict.Matches ? 'kheops-match' : 'kheops-miss')
          .text(verdict.Matches ? 'yes' : 'no'))
        .append(values));
    });
    return $('<div>').append($('<p>').text(
      result.Matched + ' of ' + plural(result.Series.length, 'series') + ' match' +
      (result.Tags.length ? '; tags read: ' + result.Tags.join(', ') : '') + '.')).append(table);
  }

  $(document).on('submit', '#kheops-dry-run', function (event) {
    event.preventDefault();
    var form = $(this);
    var study = $('#kheops-try-study').val();
    var output = $('#kheops-try-result').empty();
    clearErrors(form);
    if (!study) {
      showError(form, { field: 'Resources', message: 'Choose a study first.' },
                $('#kheops-try-error'));
      return;
    }
    var body = { Condition: $('#kheops-try-condition').val(), Resources: [study] };
    $.when(api('POST', 'rules/test', body), api('GET', 'resources/studies/' + study))
      .done(function (test, resource) {
        var series = {};
        $.each(resource[0].Series || [], function (_, s) { series[s.ID] = s; });
        output.append(dryRunTable(test[0], series));
      }).fail(function (xhr) {
        showError(form, failure(xhr), $('#kheops-try-error'));
      });
  });

  // -- study and series pages: forwarding status, backfill, share into a rule --------------

  function resourceBox(level) {
    return '<ul data-role="listview" data-inset="true" data-theme="d" data-divider-theme="c"' +
      ' class="kheops-box" data-level="' + level + '">' +
      '<li data-role="list-divider">KHEOPS</li>' +
      '<li class="kheops-resource-state"><p><strong class="kheops-summary">…</strong></p>' +
      '<p class="kheops-reasons"></p></li>' +
      '<li data-icon="refresh" class="kheops-retry-item" style="display:none">' +
      '<a href="#" class="kheops-retry-resource">Retry the failed instances</a></li>' +
      '<li data-icon="forward"><a href="#" class="kheops-send">Send to KHEOPS</a></li>' +
      '<li data-icon="plus"><a href="#" class="kheops-share">Share into…</a></li>' +
      '<li class="kheops-share-form" style="display:none">' +
      '<select class="kheops-share-rule" data-mini="true"></select>' +
      '<a href="#" data-role="button" data-mini="true" data-inline="true" data-theme="b"' +
      ' class="kheops-share-apply">' +
      'Share</a></li>' +
      (level === 'studies' ? '<li data-icon="search"><a href="#" class="kheops-try-study">' +
        'Try a rule condition on this study</a></li>' : '') +
      '<li class="kheops-resource-message" style="display:none"></li>' +
      '</ul>';
  }

  var LEVELS = { study: 'studies', series: 'series' };

  $.each(LEVELS, function (page, level) {
    $(document).on('pagebeforecreate', '#' + page, function () {
      $(this).find('.ui-block-a > div').first().append(resourceBox(level));
    });
    $(document).on('pagebeforeshow', '#' + page, function () {
      var box = $(this).find('.kheops-box');
      box.find('.kheops-share-form, .kheops-resource-message').hide();
      loadResource(box);
    });
  });

  function currentResource() {
    return $.mobile.pageData ? $.mobile.pageData.uuid : '';
  }

  function describeCounts(counts) {
    var parts = [];
    if (counts.Sent) { parts.push(counts.Sent + ' sent'); }
    if (counts.Pending + counts.InFlight) { parts.push(counts.Pending + counts.InFlight + ' pending'); }
    if (counts.Failed) { parts.push(counts.Failed + ' failed'); }
    if (counts.NotQueued) { parts.push(counts.NotQueued + ' never queued'); }
    return parts.join(', ');
  }

  var STATE_TONES = { sent: 'ok', pending: 'warn', failed: 'bad', 'not queued': 'off', empty: 'off' };

  var STATE_WORDS = {
    sent: 'Sent to KHEOPS', pending: 'On its way to KHEOPS', failed: 'Failed',
    'not queued': 'Not sent (stored before the plugin ran?)', empty: 'No instance'
  };

  function loadResource(box) {
    var level = box.attr('data-level');
    var uuid = currentResource();
    api('GET', 'resources/' + level + '/' + uuid).done(function (resource) {
      box.attr('data-state', resource.State);
      box.find('.kheops-resource-state').removeClass('kheops-ok kheops-warn kheops-bad kheops-off')
        .addClass('kheops-' + STATE_TONES[resource.State]);
      box.find('.kheops-summary').text(
        STATE_WORDS[resource.State] + ': ' + describeCounts(resource.Counts));
      var reasons = box.find('.kheops-reasons').empty();
      var seen = {};
      $.each(resource.Failures, function (_, failed) {
        if (!seen[failed.LastError]) {  // one line per reason, not per instance
          seen[failed.LastError] = true;
          reasons.append($('<span class="kheops-error">').text(failed.LastError)).append('<br>');
        }
      });
      box.data('failed', $.map(resource.Failures, function (failed) { return failed.ID; }));
      box.find('.kheops-retry-item').toggle(resource.Failures.length > 0);
      box.listview('refresh');
      $.each(resource.Series || [], function (_, series) {
        var link = $('#list-series a[href="#series?uuid=' + series.ID + '"]');
        link.find('.kheops-series-badge').remove();
        link.append($('<p class="kheops-series-badge">').text(
          'KHEOPS: ' + (describeCounts(series.Counts) || 'no instance')));
      });
      // Follow a backfill until it is done, while this page is still the one shown.
      if (resource.State === 'pending') {
        setTimeout(function () {
          if (box.closest('.ui-page-active').length && currentResource() === uuid) {
            loadResource(box);
          }
        }, REFRESH_MS);
      }
    }).fail(function (xhr) {
      box.find('.kheops-summary').text(failure(xhr).message);
    });
  }

  function boxMessage(box, text, tone) {
    box.find('.kheops-resource-message').removeClass('kheops-ok kheops-bad')
      .addClass('kheops-' + tone).text(text).show();
    box.listview('refresh');
  }

  $(document).on('click', '.kheops-send', function (event) {
    event.preventDefault();
    var box = $(this).closest('.kheops-box');
    api('POST', 'send', { Resources: [currentResource()] }).done(function (answer) {
      boxMessage(box, plural(answer.Queued, 'instance') + ' queued for KHEOPS.', 'ok');
      loadResource(box);
    }).fail(function (xhr) {
      boxMessage(box, failure(xhr).message, 'bad');
    });
  });

  $(document).on('click', '.kheops-retry-resource', function (event) {
    event.preventDefault();
    var box = $(this).closest('.kheops-box');
    api('POST', 'queue/retry', { Instances: box.data('failed') || [] }).done(function (answer) {
      boxMessage(box, plural(answer.Retried, 'instance') + ' queued again.', 'ok');
      loadResource(box);
    }).fail(function (xhr) {
      boxMessage(box, failure(xhr).message, 'bad');
    });
  });

  $(document).on('click', '.kheops-share', function (event) {
    event.preventDefault();
    var box = $(this).closest('.kheops-box');
    var form = box.find('.kheops-share-form');
    var select = box.find('.kheops-share-rule');
    api('GET', 'rules').done(function (rules) {
      select.empty();
      $.each(rules, function (_, rule) {
        if (rule.Enabled) {
          select.append($('<option>').attr('value', rule.Name).text(
            rule.Name + ' → album ' + (rule.DestinationAlbumId || '?')));
        }
      });
      if (!select.children().length) {
        boxMessage(box, 'No enabled switching rule: create one on the KHEOPS rules page.', 'bad');
        return;
      }
      select.selectmenu('refresh', true);
      form.show();
    }).fail(function (xhr) {
      boxMessage(box, failure(xhr).message, 'bad');
    });
  });

  $(document).on('click', '.kheops-share-apply', function (event) {
    event.preventDefault();
    var box = $(this).closest('.kheops-box');
    var rule = box.find('.kheops-share-rule').val();
    api('POST', 'rules/' + encodeURIComponent(rule) + '/apply', { Resources: [currentResource()] })
      .done(function (answer) {
        var text = 'Rule ' + answer.Rule + ': ' + answer.Matched + ' of ' +
          plural(answer.Series, 'series') + ' match, ' + answer.Queued + ' queued for sharing.';
        if (answer.NotInMainAlbum) {
          text += ' ' + plural(answer.NotInMainAlbum, 'series') +
            ' not in the main album yet: send them to KHEOPS first.';
        }
        boxMessage(box, text, 'ok');
      }).fail(function (xhr) {
        boxMessage(box, failure(xhr).message, 'bad');
      });
  });

  $(document).on('click', '.kheops-try-study', function (event) {
    event.preventDefault();
    window.location.hash = '#kheops-rules?study=' + currentResource();
  });
}());
