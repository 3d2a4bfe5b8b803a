// KHEOPS in the legacy Orthanc Explorer: a way into the KHEOPS web app, nothing more.
//
// Orthanc appends this file to its explorer.js (ExtendOrthancExplorer). The pages themselves
// are the app served at /kheops/app/ (one implementation for every Orthanc UI); this adds a
// KHEOPS button and the state in one line to the home page, and a box with the forwarding
// state and a link into the app to study and series pages. Server text goes in with .text().
(function () {
  'use strict';

  var APP = '../kheops/app/';  // relative to /app/explorer.html, behind a reverse proxy too

  function api(path) {
    // jQuery adds the ?token= headers Explorer set up in $.ajaxSetup, the browser Basic auth.
    return $.ajax({ url: '../kheops/' + path, dataType: 'json', cache: false });
  }

  $(document).on('pagebeforecreate', '#lookup', function () {
    $(this).find('[data-role="header"] .ui-btn-right').append(
      $('<a data-icon="forward" data-role="button" data-ajax="false" id="kheops-home-button">')
        .attr('href', APP).text('KHEOPS'));
    $(this).find('[data-role="content"]').first().prepend(
      $('<p id="kheops-home-status">').append($('<a data-ajax="false">').attr('href', APP)
        .text('KHEOPS')));
  });

  $(document).on('pagebeforeshow', '#lookup', function () {
    api('status').done(function (status) {
      var c = status.Counts;
      $('#kheops-home-status a').text('KHEOPS: ' + (status.StateDetail || status.State) +
        ' — ' + c.Sent + ' sent, ' + c.Queued + ' queued, ' + c.Failed + ' failed');
    });
  });

  var PAGES = { study: ['studies', '#study/'], series: ['series', '#series/'] };

  $.each(PAGES, function (page, where) {
    $(document).on('pagebeforecreate', '#' + page, function () {
      $(this).find('.ui-block-a > div').first().append(
        '<ul data-role="listview" data-inset="true" data-theme="d" data-divider-theme="c"' +
        ' class="kheops-box"><li data-role="list-divider">KHEOPS</li>' +
        '<li><p><strong class="kheops-summary">…</strong></p></li>' +
        '<li data-icon="forward"><a class="kheops-open" data-ajax="false">' +
        'Open in the KHEOPS app (send, retry, share, try a condition)</a></li></ul>');
    });
    $(document).on('pagebeforeshow', '#' + page, function () {
      var uuid = $.mobile.pageData ? $.mobile.pageData.uuid : '';
      var box = $(this).find('.kheops-box');
      box.find('.kheops-open').attr('href', APP + where[1] + uuid);
      api('resources/' + where[0] + '/' + uuid).done(function (resource) {
        var c = resource.Counts;
        box.find('.kheops-summary').text(resource.State + ': ' + c.Sent + ' sent, ' +
          (c.Pending + c.InFlight) + ' pending, ' + c.Failed + ' failed, ' + c.NotQueued +
          ' never queued');
      }).fail(function (xhr) {
        box.find('.kheops-summary').text('KHEOPS: HTTP ' + xhr.status);
      });
    });
  });
}());
