// What the plugin's answers mean, in words an administrator reads first.

export function when(iso) {
  if (!iso) { return 'never'; }
  const date = new Date(iso);
  const time = date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  if (date.toDateString() === new Date().toDateString()) { return time; }
  return date.toLocaleDateString() + ' ' + time;
}

export function plural(count, word) {
  return count + ' ' + word + (count === 1 || word === 'series' ? '' : 's');
}

export function stateInWords(status) {
  const detail = (status.StateDetail || '').replace(/^Paused: /, '');
  if (!status.Enabled) {
    return { tone: 'off', text: 'Not sending: forwarding is disabled (Kheops.Enabled is false)',
             detail: 'Instances are queued and will be sent once it is enabled.' };
  }
  if (status.StoreError) {
    return { tone: 'bad',
             text: "Not saving: the plugin's state cannot be written since " +
                   when(status.StoreError.Since),
             detail: status.StoreError.Error + '. Nothing accepted is lost: the write is' +
                     ' retried until it goes through (is the disk full?).' };
  }
  if (status.State === 'paused' && /redirect/i.test(detail)) {
    const code = /\((3\d\d)\)/.exec(detail);
    return { tone: 'bad',
             text: 'Paused: Kheops.Url redirects' + (code ? ' (' + code[1] + ')' : '') +
                   ' since ' + when(status.Since),
             detail: detail + '. Nothing is lost: instances stay queued, and sending resumes' +
                     ' once Kheops.Url names the KHEOPS root itself.' };
  }
  if (status.State === 'paused') {
    const code = /answered (\d{3})/.exec(detail);
    return { tone: 'bad',
             text: 'Paused: KHEOPS refuses the token' + (code ? ' (' + code[1] + ')' : '') +
                   ' since ' + when(status.Since),
             detail: detail + '. Nothing is lost: instances stay queued, and sending resumes' +
                     ' by itself once KHEOPS accepts the token again.' };
  }
  if (status.State === 'orthanc-unavailable') {
    return { tone: 'bad',
             text: "Not sending: the plugin cannot read from Orthanc's REST API since " +
                   when(status.Since),
             detail: detail + '. Nothing is lost: instances stay queued (check' +
                     ' Kheops.OrthancUrl).' };
  }
  if (status.State === 'unreachable') {
    return { tone: 'warn', detail,
             text: 'KHEOPS unreachable since ' + when(status.Since) + ', retrying' };
  }
  const queued = status.Counts.Queued + status.Counts.InFlight;
  const last = status.LastError
    ? 'Last error, at ' + when(status.LastErrorAt) + ': ' + status.LastError : '';
  return { tone: 'ok', detail: last,
           text: queued ? 'Sending: ' + plural(queued, 'instance') + ' to go' : 'Sending' };
}

export function describeCounts(counts) {
  const parts = [];
  if (counts.Sent) { parts.push(counts.Sent + ' sent'); }
  if (counts.Pending + counts.InFlight) { parts.push(counts.Pending + counts.InFlight + ' pending'); }
  if (counts.Failed) { parts.push(counts.Failed + ' failed'); }
  if (counts.NotQueued) { parts.push(counts.NotQueued + ' never queued'); }
  return parts.join(', ') || 'no instance';
}

export const RESOURCE_STATES = {
  sent: { tone: 'ok', text: 'Sent to KHEOPS' },
  pending: { tone: 'warn', text: 'On its way to KHEOPS' },
  failed: { tone: 'bad', text: 'Failed' },
  'not queued': { tone: 'off', text: 'Not sent (stored before the plugin ran?)' },
  empty: { tone: 'off', text: 'No instance' },
};
