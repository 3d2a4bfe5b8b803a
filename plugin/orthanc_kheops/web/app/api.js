// The plugin's /kheops/... routes, fetched same-origin: the browser sends the credentials it
// already uses for Orthanc (Basic authentication, or whatever sits in front of Orthanc).

export class ApiError extends Error {
  constructor(message, { status = 0, field = '' } = {}) {
    super(message);
    this.status = status;   // 0: no answer at all
    this.field = field;     // the field the plugin named, if any
  }

  // No answer, or an answer from something in front of the plugin: not the plugin's verdict.
  get unreachable() {
    return this.status === 0 || this.status === 502 || this.status === 503 ||
      this.status === 504;
  }
}

// Orthanc's own REST API, from the app at /kheops/app/: "../../" is Orthanc's root.
export async function orthanc(path) {
  return api('GET', '../' + path);
}

export async function api(method, path, body) {
  const init = { method, headers: { Accept: 'application/json' }, cache: 'no-store' };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    // The app lives at /kheops/app/: "../" is /kheops/, behind a reverse proxy too.
    response = await fetch('../' + path, init);
  } catch (error) {
    throw new ApiError('no answer from Orthanc (' + error.message + ')');
  }
  const text = await response.text();
  let answer = null;
  try { answer = text ? JSON.parse(text) : null; } catch { answer = null; }
  if (!response.ok) {
    if (answer && answer.Message) {
      throw new ApiError(answer.Message, { status: response.status, field: answer.Field || '' });
    }
    const words = response.status === 401 ? 'Orthanc asks for credentials again'
      : 'HTTP ' + response.status + ' ' + response.statusText;
    throw new ApiError(words, { status: response.status });
  }
  if (answer === null && text) {
    throw new ApiError('the answer is not JSON', { status: response.status });
  }
  return answer;
}
