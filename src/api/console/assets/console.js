// The Frostglass console. Every figure on a page comes from the /v1 API as
// JSON and is shown as it came (numbers rounded for display only, the exact
// value kept in data-value); nothing is computed here. Text from the API is
// only ever set as text (never as HTML), so a dataset title or a buyer's SQL
// cannot become markup. State changes send the session's CSRF token.
'use strict';

const session = { csrf: null, me: null };

class ApiFailure extends Error {
  constructor(status, error) {
    super(`${error.code || status}: ${error.message || ''}`);
    this.status = status;
    this.code = error.code;
  }
}

async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET') headers['X-CSRF-Token'] = session.csrf;
  const init = { method, headers, credentials: 'same-origin' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (response.status === 401) {
    window.location.assign('/console/');
  }
  if (!response.ok) {
    throw new ApiFailure(response.status, (json && json.error) || { message: response.statusText });
  }
  return json;
}

// --- DOM, built from text only -------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  for (const child of children.flat()) {
    if (child !== undefined && child !== null) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Display only: integers as they are, other numbers to 4 decimals.
function shown(value) {
  if (value === null || value === undefined) return '—';
  if (typeof value === 'number') return Number.isInteger(value) ? String(value) : value.toFixed(4);
  if (typeof value === 'boolean') return value ? 'yes' : 'no';
  if (typeof value === 'object') return JSON.stringify(value);
  return String(value);
}

function cell(value, field) {
  const exact = value === null || value === undefined ? '' : (typeof value === 'object' ? JSON.stringify(value) : String(value));
  return el('td', { 'data-field': field, 'data-value': exact }, shown(value));
}

// columns: [[label, field, (row) => value]]; a value may also be a Node.
function table(id, columns, rows, empty) {
  if (!rows.length) return el('p', { id, class: 'empty' }, empty || 'Nothing yet.');
  return el('table', { id },
    el('thead', {}, el('tr', {}, columns.map(([label]) => el('th', { scope: 'col' }, label)))),
    el('tbody', {}, rows.map((row, i) => el('tr', { 'data-row': i },
      columns.map(([, field, get]) => {
        const value = get ? get(row) : row[field];
        return value instanceof Node ? el('td', { 'data-field': field }, value) : cell(value, field);
      })))));
}

function section(id, title, ...content) {
  return el('section', { id }, el('h2', {}, title), ...content);
}

function failure(e) {
  return el('p', { class: 'error', role: 'alert' }, e instanceof ApiFailure ? `Refused (${e.code || e.status}): ${e.message}` : String(e));
}

// Loads a section's data; a refusal shows in the section, the rest of the page stands.
async function filled(id, title, build) {
  const box = section(id, title, el('p', { class: 'loading' }, 'Loading…'));
  try {
    const content = await build();
    box.replaceChildren(el('h2', {}, title), ...[content].flat(Infinity));
  } catch (e) {
    box.replaceChildren(el('h2', {}, title), failure(e));
  }
  return box;
}

// --- charts (SVG, no library) --------------------------------------------

const PALETTE = ['#2b6cb0', '#c05621', '#2f855a', '#6b46c1', '#b83280', '#2c7a7b', '#975a16', '#4a5568'];

// Bars per category (x), stacked by series: data = [{x, series, value}].
function stackedBars(id, data, label) {
  if (!data.length) return el('p', { class: 'empty' }, 'Nothing to chart yet.');
  const xs = [...new Set(data.map((d) => d.x))].sort();
  const series = [...new Set(data.map((d) => d.series))].sort();
  const totals = xs.map((x) => data.filter((d) => d.x === x).reduce((a, d) => a + d.value, 0));
  const max = Math.max(...totals, 1e-12);
  const width = 640, height = 200, left = 48, bottom = 28, bar = Math.min(48, Math.max(4, (width - left) / xs.length - 6));
  const chart = svg('svg', { id, class: 'chart', viewBox: `0 0 ${width} ${height + bottom}`, role: 'img', 'aria-label': label });
  chart.append(svg('text', { x: 0, y: 12, class: 'axis' }, shown(max)));
  chart.append(svg('line', { x1: left - 4, y1: height, x2: width, y2: height, class: 'axis-line' }));
  xs.forEach((x, i) => {
    let y = height;
    const cx = left + i * ((width - left) / xs.length);
    series.forEach((s, k) => {
      const value = data.filter((d) => d.x === x && d.series === s).reduce((a, d) => a + d.value, 0);
      if (!value) return;
      const h = (value / max) * (height - 16);
      y -= h;
      chart.append(svg('rect', { x: cx, y, width: bar, height: h, fill: PALETTE[k % PALETTE.length] },
        svg('title', {}, `${x} · ${s}: ${shown(value)}`)));
    });
    if (xs.length <= 12 || i % Math.ceil(xs.length / 12) === 0) {
      chart.append(svg('text', { x: cx, y: height + 16, class: 'axis' }, String(x).slice(5)));
    }
  });
  const legend = el('ul', { class: 'legend' }, series.map((s, k) =>
    el('li', {}, el('span', { class: `swatch swatch-${k % PALETTE.length}` }), s)));
  return el('figure', {}, chart, legend);
}

// A line of points [{x, y}] from a maximum down to zero.
function burnDown(id, points, limit, label) {
  if (!points.length) return el('p', { class: 'empty' }, 'No ε spent yet.');
  const width = 640, height = 160, left = 48;
  const step = points.length > 1 ? (width - left) / (points.length - 1) : 0;
  const y = (v) => height - (v / Math.max(limit, 1e-12)) * (height - 12);
  const path = points.map((p, i) => `${i ? 'L' : 'M'}${left + i * step},${y(p.y)}`).join(' ');
  const chart = svg('svg', { id, class: 'chart', viewBox: `0 0 ${width} ${height + 24}`, role: 'img', 'aria-label': label },
    svg('text', { x: 0, y: 12, class: 'axis' }, shown(limit)),
    svg('text', { x: 0, y: height, class: 'axis' }, '0'),
    svg('line', { x1: left, y1: height, x2: width, y2: height, class: 'axis-line' }),
    svg('path', { d: path, class: 'burn' }),
    points.map((p, i) => svg('circle', { cx: left + i * step, cy: y(p.y), r: 3, class: 'burn-point' },
      svg('title', {}, `${p.x}: ${shown(p.y)} left`))),
    svg('text', { x: left, y: height + 18, class: 'axis' }, points[0].x),
    svg('text', { x: width - 70, y: height + 18, class: 'axis' }, points[points.length - 1].x));
  return chart;
}

// --- buttons that change state ---------------------------------------------

function action(label, attrs, run) {
  const button = el('button', { type: 'button', ...attrs }, label);
  button.addEventListener('click', async () => {
    button.disabled = true;
    const status = button.parentElement.querySelector('.status') || button.parentElement.appendChild(el('span', { class: 'status' }));
    try {
      await run();
      status.textContent = 'Done.';
      await render();
    } catch (e) {
      status.replaceChildren(failure(e));
      button.disabled = false;
    }
  });
  return button;
}

// --- owner ----------------------------------------------------------------

function pricing(p) {
  if (!p) return '—';
  return Object.entries(p).map(([k, v]) => `${k.replace(/_/g, ' ')}: ${v}`).join(' · ');
}

function qualityCard(q) {
  if (!q) return el('span', {}, '—');
  const figures = Object.entries(q).filter(([, v]) => typeof v !== 'object' || v === null);
  return el('details', { class: 'card' }, el('summary', {}, 'quality card'),
    el('dl', {}, figures.map(([k, v]) => [el('dt', {}, k), el('dd', { 'data-field': `quality.${k}`, 'data-value': String(v) }, shown(v))])));
}

async function ownerDatasets(datasets) {
  return table('datasets', [
    ['Dataset', 'id'],
    ['Title', 'title'],
    ['Status', 'status', (d) => (d.pending && d.pending.status) || d.status],
    ['Rows (card)', 'rows'],
    ['Price', 'pricing', (d) => pricing(d.pricing)],
    ['Lifetime ε spent', 'lifetime_epsilon.spent', (d) => d.lifetime_epsilon && d.lifetime_epsilon.spent],
    ['Lifetime ε limit', 'lifetime_epsilon.limit', (d) => d.lifetime_epsilon && d.lifetime_epsilon.limit],
    ['Quality', 'quality', (d) => qualityCard(d.quality)],
  ], datasets, 'You have no datasets.');
}

function requestRow(r) {
  const epsilon = el('input', { type: 'number', min: '0', step: 'any', placeholder: r.epsilon === null || r.epsilon === undefined ? 'as asked' : String(r.epsilon), 'aria-label': 'ε for the grant', class: 'narrow-epsilon' });
  const perDay = el('input', { type: 'number', min: '1', step: '1', placeholder: shown(r.quotas && r.quotas.queries_per_day), 'aria-label': 'queries per day', class: 'narrow-queries' });
  const review = el('input', { type: 'checkbox', class: 'require-review', 'aria-label': 'review every answer' });
  const reason = el('input', { type: 'text', maxlength: '2000', placeholder: 'reason to reject', class: 'reject-reason', 'aria-label': 'reason to reject' });
  const approve = action('Approve', { class: 'approve-request', 'data-request': r.id }, () => {
    const body = { review: review.checked };
    if (epsilon.value !== '') body.epsilon = Number(epsilon.value);
    if (perDay.value !== '') body.quotas = { queries_per_day: Number(perDay.value) };
    return api('POST', `/v1/access-requests/${encodeURIComponent(r.id)}/approve`, body);
  });
  const reject = action('Reject', { class: 'reject-request', 'data-request': r.id }, () =>
    api('POST', `/v1/access-requests/${encodeURIComponent(r.id)}/reject`, { reason: reason.value || 'rejected in the console' }));
  return el('div', { class: 'decision' },
    el('label', {}, 'ε ', epsilon), el('label', {}, 'queries/day ', perDay),
    el('label', {}, review, ' review every answer'), approve, reason, reject);
}

async function ownerRequests(me) {
  const { requests } = await api('GET', '/v1/access-requests');
  const waiting = requests.filter((r) => r.status === 'pending' && !r.decisions.some((d) => d.by === me.principal));
  return table('requests', [
    ['Request', 'id'],
    ['Buyer', 'buyer'],
    ['Datasets', 'datasets', (r) => r.datasets.join(', ')],
    ['Purpose', 'purpose'],
    ['ε asked', 'epsilon'],
    ['Decide', 'decide', requestRow],
  ], waiting, 'No requests wait for your decision.');
}

function answerTable(answer) {
  const columns = (answer.columns || []).map((c, i) => [c.name, c.name, (row) => row[i]]);
  return table(null, columns, answer.rows || [], 'No rows released.');
}

async function ownerReviews() {
  const { waiting } = await api('GET', '/v1/reviews');
  if (!waiting.length) return el('p', { id: 'reviews', class: 'empty' }, 'No answers wait for your review.');
  return el('div', { id: 'reviews' }, waiting.map((w) => el('article', { class: 'review', 'data-query': w.query_id },
    el('h3', {}, `${w.query_id} · ${w.buyer}`),
    el('pre', { class: 'sql' }, w.sql),
    el('details', {}, el('summary', {}, 'decision trace'), el('pre', {}, JSON.stringify(w.trace, null, 2))),
    answerTable(w.answer || {}),
    el('div', { class: 'decision' },
      action('Approve', { class: 'approve-answer', 'data-query': w.query_id }, () => api('POST', `/v1/reviews/${encodeURIComponent(w.query_id)}/approve`)),
      action('Reject', { class: 'reject-answer', 'data-query': w.query_id }, () => api('POST', `/v1/reviews/${encodeURIComponent(w.query_id)}/reject`))))));
}

async function ownerUsage(datasets) {
  const reports = await Promise.all(datasets.map((d) => api('GET', `/v1/datasets/${encodeURIComponent(d.id)}/usage`)));
  const usageRows = reports.flatMap((r) => r.usage.map((u) => ({ dataset: r.dataset, ...u })));
  const burns = reports.filter((r) => r.lifetime_epsilon && r.lifetime_epsilon.by_day);
  return [
    stackedBars('usage-chart', usageRows.map((u) => ({ x: u.day, series: u.principal, value: u.queries_answered })), 'Answered queries per day by buyer'),
    table('usage', [
      ['Dataset', 'dataset'], ['Day', 'day'], ['Buyer', 'principal'], ['Grant', 'grant'],
      ['Answered', 'queries_answered'], ['Refused', 'queries_refused'], ['ε', 'epsilon'], ['Charge', 'charge'],
    ], usageRows, 'No use yet.'),
    el('h3', {}, 'Lifetime ε'),
    burns.length ? burns.map((r) => el('div', { class: 'burn-down', 'data-dataset': r.dataset },
      el('h4', {}, r.dataset),
      el('p', {}, 'Remaining ', el('strong', { 'data-field': 'remaining', 'data-value': String(r.lifetime_epsilon.remaining) }, shown(r.lifetime_epsilon.remaining)),
        ' of ', el('span', { 'data-field': 'limit', 'data-value': String(r.lifetime_epsilon.limit) }, shown(r.lifetime_epsilon.limit)),
        ' · pace ', el('span', { 'data-field': 'pace_per_day', 'data-value': String(r.lifetime_epsilon.pace_per_day) }, shown(r.lifetime_epsilon.pace_per_day)), ' a day',
        ' · runs out ', el('span', { 'data-field': 'projected_exhaustion', 'data-value': r.lifetime_epsilon.projected_exhaustion || '' }, r.lifetime_epsilon.projected_exhaustion || 'not at this pace')),
      burnDown(`burn-${r.dataset}`, r.lifetime_epsilon.by_day.map((d) => ({ x: d.day, y: d.remaining })), r.lifetime_epsilon.limit, `Lifetime ε left of ${r.dataset}`)))
      : el('p', { class: 'empty' }, 'None of your datasets is released under differential privacy.'),
  ];
}

async function refusals(id) {
  const { refusals: rows } = await api('GET', '/v1/refusals?days=30');
  return [
    stackedBars(`${id}-chart`, rows.map((r) => ({ x: r.day, series: r.rule || r.code || 'unspecified', value: r.count })), 'Refusals per day by rule'),
    table(id, [['Day', 'day'], ['Code', 'code'], ['Rule', 'rule'], ['Refusals', 'count']], rows, 'No refusals in the last 30 days.'),
  ];
}

async function ownerView(me) {
  const { datasets } = await api('GET', '/v1/datasets?mine=true');
  return [
    await filled('my-datasets', 'My datasets', () => ownerDatasets(datasets)),
    await filled('waiting-requests', 'Requests waiting for my decision', () => ownerRequests(me)),
    await filled('review-queue', 'Answers waiting for review', ownerReviews),
    await filled('dataset-usage', 'Use of my datasets per buyer and day', () => ownerUsage(datasets)),
    await filled('my-refusals', 'Refusals of queries on my data (30 days)', () => refusals('refusals')),
  ];
}

// --- auditor ----------------------------------------------------------------

function verification(v) {
  if (!v) return el('p', { id: 'verification', class: 'empty' }, 'Not verified since the server started.');
  return el('dl', { id: 'verification', class: v.ok ? 'ok' : 'broken' },
    el('dt', {}, 'Result'), el('dd', { 'data-field': 'ok', 'data-value': String(v.ok) }, v.ok ? 'verifies' : 'BROKEN'),
    el('dt', {}, 'First broken index'), el('dd', { 'data-field': 'broken_index', 'data-value': v.broken_index === null ? '' : String(v.broken_index) }, shown(v.broken_index)),
    el('dt', {}, 'Summary'), el('dd', { 'data-field': 'summary' }, v.summary),
    el('dt', {}, 'Entries'), el('dd', { 'data-field': 'ledger_size', 'data-value': String(v.ledger_size) }, shown(v.ledger_size)),
    el('dt', {}, 'Checked at'), el('dd', { 'data-field': 'checked_at' }, v.checked_at));
}

async function ledgerHealth() {
  const [head, last] = await Promise.all([api('GET', '/v1/audit/head'), api('GET', '/v1/audit/verify')]);
  return [
    el('dl', { id: 'ledger-head' },
      el('dt', {}, 'Entries'), el('dd', { 'data-field': 'tree_size', 'data-value': String(head.tree_size) }, shown(head.tree_size)),
      el('dt', {}, 'Root'), el('dd', { 'data-field': 'root_hash', class: 'hash' }, head.root_hash),
      el('dt', {}, 'Signed by'), el('dd', { 'data-field': 'key_id' }, head.key_id)),
    verification(last.last),
    el('div', {}, action('Verify now', { id: 'verify-now' }, () => api('POST', '/v1/audit/verify'))),
  ];
}

async function allUsage() {
  const { usage } = await api('GET', '/v1/usage');
  return [
    stackedBars('all-usage-chart', usage.map((u) => ({ x: u.day, series: u.principal, value: u.queries_answered })), 'Answered queries per day by buyer'),
    table('all-usage', [
      ['Day', 'day'], ['Buyer', 'principal'], ['Grant', 'grant'], ['Answered', 'queries_answered'],
      ['Refused', 'queries_refused'], ['Rows scanned', 'rows_scanned'], ['ε', 'epsilon'], ['Charge', 'charge'],
    ], usage, 'No use yet.'),
  ];
}

function settlementTable(statement) {
  return [
    el('p', {}, 'Period ', el('strong', {}, statement.period), ' · total ',
      el('strong', { 'data-field': 'total', 'data-value': statement.total }, statement.total),
      ' · ledger prefix ', el('span', { 'data-field': 'tree_size', 'data-value': String(statement.tree_size) }, shown(statement.tree_size))),
    table('settlement-lines', [
      ['Grant', 'grant'], ['Buyer', 'buyer'], ['Owner', 'owner'], ['Currency', 'currency'],
      ['Subscription', 'subscription'], ['Metered', 'metered'], ['Total', 'total'],
    ], statement.lines, 'Nothing to settle in this period.'),
  ];
}

async function settlement() {
  const month = new Date().toISOString().slice(0, 7);
  const picker = el('input', { type: 'month', value: month, id: 'period', 'aria-label': 'period' });
  const out = el('div', { id: 'settlement' });
  const load = async () => {
    try { out.replaceChildren(...settlementTable(await api('GET', `/v1/settlements?period=${encodeURIComponent(picker.value)}`))); } catch (e) { out.replaceChildren(failure(e)); }
  };
  picker.addEventListener('change', load);
  await load();
  return [el('label', {}, 'Period ', picker), out];
}

function auditSql() {
  const box = el('textarea', { id: 'audit-sql', rows: '4', spellcheck: 'false', 'aria-label': 'SQL over usage' },
    'SELECT decision, rule, COUNT(*) AS queries FROM usage GROUP BY decision, rule ORDER BY queries DESC');
  const out = el('div', { id: 'audit-result' });
  const run = el('button', { type: 'button', id: 'run-sql' }, 'Run');
  run.addEventListener('click', async () => {
    try {
      const result = await api('POST', '/v1/audit/sql', { sql: box.value });
      out.replaceChildren(table('audit-table', result.columns.map((c, i) => [c.name, c.name, (row) => row[i]]), result.rows, 'No rows.'));
    } catch (e) { out.replaceChildren(failure(e)); }
  });
  return [el('p', {}, 'Tables: usage, requests, decisions, grants. Never a dataset.'), box, run, out];
}

async function auditorView() {
  return [
    await filled('ledger', 'Ledger', ledgerHealth),
    await filled('usage-all', 'Usage across all grants', allUsage),
    await filled('settlements', 'Settlement', settlement),
    await filled('refusals-all', 'Refusals by rule (30 days)', () => refusals('refusals')),
    section('sql', 'Audit SQL', ...auditSql()),
  ];
}

// --- buyer ------------------------------------------------------------------

async function buyerGrants() {
  const { grants } = await api('GET', '/v1/grants');
  return table('grants', [
    ['Grant', 'grant.id', (g) => g.grant.id],
    ['Datasets', 'grant.datasets', (g) => g.grant.datasets.join(', ')],
    ['Purpose', 'grant.purpose', (g) => g.grant.purpose],
    ['Queries left today', 'remaining_today.queries', (g) => g.remaining_today.queries],
    ['Rows left today', 'remaining_today.rows', (g) => g.remaining_today.rows],
    ['ε left', 'budget.epsilon_remaining', (g) => g.budget.epsilon_remaining],
    ['ε limit', 'budget.epsilon_limit', (g) => g.budget.epsilon_limit],
  ], grants, 'You hold no grants.');
}

async function buyerHistory() {
  const { queries } = await api('GET', '/v1/queries?limit=100');
  return table('history', [
    ['When', 'at'], ['Query', 'query_id'], ['Datasets', 'datasets', (q) => q.datasets.join(', ')],
    ['Decision', 'decision'], ['Rule', 'rule'], ['ε', 'epsilon'], ['Charge', 'charge'],
    ['Receipt', 'evidence', (q) => q.evidence
      ? el('a', { href: q.evidence, download: `receipt-${q.query_id}.json`, class: 'receipt' }, 'download')
      : el('span', {}, '—')],
  ], queries, 'No queries yet.');
}

async function buyerView() {
  return [
    await filled('my-grants', 'My grants', buyerGrants),
    await filled('my-queries', 'My queries', buyerHistory),
  ];
}

// --- the page ----------------------------------------------------------------

async function render() {
  const view = document.body.dataset.view;
  const main = document.getElementById('main');
  if (view === 'refused') {
    main.replaceChildren(el('p', { class: 'error', id: 'refused' }, 'This view is not for your role.'),
      el('a', { href: `/console/${document.body.dataset.home}` }, 'Go to your view'));
    return;
  }
  const views = { owner: ownerView, auditor: auditorView, buyer: buyerView };
  main.replaceChildren(...(await views[view](session.me)));
  main.dataset.ready = 'true';
}

async function start() {
  session.me = await api('GET', '/console/session');
  session.csrf = session.me.csrf;
  document.getElementById('who').textContent = `${session.me.principal} (${session.me.role})`;
  document.getElementById('sign-out').addEventListener('click', async () => {
    await api('DELETE', '/console/session');
    window.location.assign('/console/');
  });
  await render();
}

document.addEventListener('DOMContentLoaded', () => {
  start().catch((e) => document.getElementById('main').replaceChildren(failure(e)));
});
