// Drives the router's console in headless Chromium (Debian's, through
// playwright-core) through the flows an operator uses, checking each:
// tests/tests/console.rs starts the system, prepares the events and runs
// this. Prints one JSON object of what it saw; exits non-zero on the first
// check that fails, saying which.
//
//   node console.mjs --admin-url URL --token T --chromium PATH \
//        --mock-url URL --screenshots DIR --crm-events N --markup-user U

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => {
    if (arg.startsWith('--')) pairs.push([arg.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const base = args['admin-url'];
const shots = args.screenshots;
mkdirSync(shots, { recursive: true });
const seen = {};

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
}

/// Reloads `url` until `probe(page)` is true, for at most `seconds`.
async function until(page, url, probe, what, seconds = 45) {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    await page.goto(url);
    if (await probe(page)) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await page.waitForTimeout(500);
  }
}

/// No page may scroll sideways at 1,280 px, and none may run injected script.
async function fits(page, name) {
  const { scroll, client } = await page.evaluate(() => ({
    scroll: document.documentElement.scrollWidth,
    client: document.documentElement.clientWidth,
  }));
  check(scroll <= client, `${name} scrolls sideways: scrollWidth ${scroll} > ${client}`);
  check(!(await page.evaluate(() => window.__xss)), `${name} ran injected script`);
  // Every control has a name a screen reader says, and no control is
  // out of keyboard reach.
  const unnamed = await page.evaluate(() =>
    [...document.querySelectorAll('input:not([type=hidden]), button, a, select, textarea')]
      .filter((el) => !(el.labels?.length || el.getAttribute('aria-label') || el.textContent.trim()))
      .concat([...document.querySelectorAll('[tabindex="-1"], [disabled]')])
      .map((el) => el.outerHTML.slice(0, 80)),
  );
  check(unnamed.length === 0, `${name} has controls without a name or out of keyboard reach: ${unnamed}`);
  seen[`${name}_width`] = scroll;
}

/// At 1,024 px too, and the keyboard alone can pause and resume.
async function narrowAndKeyboard(page) {
  await page.setViewportSize({ width: 1024, height: 768 });
  for (const [name, path] of [['overview', '/?refresh=off'], ['destination', '/destinations/markup'], ['create', '/create'], ['event', `/events?q=${seen.event}`]]) {
    await page.goto(`${base}${path}`);
    await fits(page, `${name} at 1024`);
  }
  await page.goto(`${base}/destinations/crm`);
  for (let i = 0; i < 20; i += 1) {
    await page.keyboard.press('Tab');
    if ((await page.evaluate(() => document.activeElement?.textContent)) === 'Pause') break;
  }
  await page.keyboard.press('Enter');
  await page.waitForURL(/done=paused/);
  await page.keyboard.press('Tab');
  for (let i = 0; i < 20; i += 1) {
    if ((await page.evaluate(() => document.activeElement?.textContent)) === 'Resume') break;
    await page.keyboard.press('Tab');
  }
  await page.keyboard.press('Enter');
  await page.waitForURL(/done=resumed/);
  const api = await (await page.request.get(`${base}/admin/destinations/crm`)).json();
  check(api.status?.paused === false, 'paused and resumed with the keyboard alone');
  await page.setViewportSize({ width: 1280, height: 800 });
}

const text = (page, selector) => page.locator(selector).first().innerText();

async function overview(page) {
  await page.goto(`${base}/?refresh=off`);
  const cards = await page.locator('article.card').count();
  check(cards >= 10, `the overview shows every destination (${cards} cards)`);
  seen.cards = cards;
  const health = async (name) => text(page, `article[data-destination=${name}] [data-field=health]`);
  check((await health('crm')) === 'healthy', 'crm is healthy on the overview');
  check((await health('markup')) === 'failing', `markup, failing every attempt, shows failing (${await health('markup')})`);
  await fits(page, 'overview');
  await page.screenshot({ path: join(shots, 'console-overview.png'), fullPage: true });
}

async function eventsCounted(page) {
  const want = Number(args['crm-events']);
  await until(
    page,
    `${base}/destinations/crm`,
    async (p) => Number(await text(p, '[data-field=attempts]')) >= want,
    `crm's page to count ${want} attempts`,
  );
  seen.crm_attempts = Number(await text(page, '[data-field=attempts]'));
  check((await text(page, '[data-field=success]')) === '100 %', 'crm succeeds every attempt');
  const peak = Number(await page.locator('figure[data-field=deliveries]').getAttribute('data-peak'));
  check(peak > 0, `crm's deliveries chart shows them (peak ${peak})`);
}

async function createWithRefusal(page) {
  await page.goto(`${base}/create`);
  await page.getByLabel('Name').fill('audit');
  await page.getByLabel('URL').fill(`${args['mock-url']}/ok/audit`);
  await page.getByLabel('Timeout (ms)').fill('soon');
  await page.getByRole('button', { name: 'Create destination' }).click();
  const error = page.locator('[data-error-for=timeout_ms]');
  check(await error.isVisible(), 'a refused field shows its message next to it');
  seen.refusal = await error.innerText();
  check(seen.refusal.includes('timeout_ms'), `the API's message names the field: ${seen.refusal}`);
  check(
    (await page.getByLabel('Timeout (ms)').getAttribute('aria-invalid')) === 'true',
    'the refused field is marked invalid',
  );
  check((await page.getByLabel('Name').inputValue()) === 'audit', 'what was typed stays');
  await fits(page, 'create');
  await page.screenshot({ path: join(shots, 'console-create.png'), fullPage: true });
  await page.getByLabel('Timeout (ms)').fill('2000');
  await page.getByRole('button', { name: 'Create destination' }).click();
  await page.waitForURL(/\/destinations\/audit/);
  check((await text(page, '[data-field=notice]')).startsWith('Created'), 'the page says it was created');
  let api = await (await page.request.get(`${base}/admin/destinations/audit`)).json();
  check(api.timeout_ms === 2000, 'the API has the created destination');

  // Its settings form refuses the same way, then saves.
  await page.getByLabel('Max attempts').fill('0');
  await page.getByRole('button', { name: 'Save settings' }).click();
  check(
    (await text(page, '[data-error-for="retry.max_attempts"]')).includes('max_attempts'),
    'a refused setting shows its message next to it',
  );
  await page.getByLabel('Max attempts').fill('3');
  await page.getByLabel('Event types').fill('order.*, audit.logged');
  await page.getByRole('button', { name: 'Save settings' }).click();
  await page.waitForURL(/done=saved/);
  api = await (await page.request.get(`${base}/admin/destinations/audit`)).json();
  check(api.retry.max_attempts === 3, `the change reached the API (max_attempts ${api.retry.max_attempts})`);
  check(api.event_types.join() === 'order.*,audit.logged', `event types saved: ${api.event_types}`);
}

async function testEvent(page) {
  await page.goto(`${base}/destinations/crm`);
  await page.getByRole('button', { name: 'Send a test event' }).click();
  await page.waitForURL(/done=test-event/);
  const id = new URL(page.url()).searchParams.get('id');
  check(/^\d+-\d+-\d+$/.test(id), `the page names the test event (${id})`);
  await until(
    page,
    `${base}/events?q=${id}`,
    async (p) => (await p.locator('tr[data-destination=crm] [data-field=state]').innerText()) === 'delivered',
    'the test event to be delivered to crm',
  );
  const others = await page.locator('tr[data-destination=team-1] [data-field=state]').innerText();
  check(others.startsWith('filtered'), `only crm gets the test event (team-1: ${others})`);
  seen.test_event = id;
}

async function eventAttempts(page) {
  await page.goto(`${base}/destinations/crm`);
  const link = page.locator('table[data-field=attempt-list] tbody tr a').first();
  const eventId = await link.innerText();
  await link.click();
  await page.waitForURL(/\/events\?q=/);
  const row = page.locator(`section[data-event="${eventId}"] tr[data-destination=crm]`);
  check((await row.locator('[data-field=state]').innerText()) === 'delivered', 'the event shows delivered to crm');
  check((await row.locator('li').count()) >= 1, 'the event shows its attempt');
  seen.event = eventId;
  await fits(page, 'event');
  await page.screenshot({ path: join(shots, 'console-event.png'), fullPage: true });

  // A user id and payload full of markup are shown as text.
  const user = args['markup-user'];
  await page.goto(`${base}/events?q=${encodeURIComponent(user)}`);
  check((await text(page, '[data-field=user]')) === user, `the user id shows as text: ${user}`);
  await fits(page, 'user lookup');
}

async function pauseAndResume(page) {
  await page.goto(`${base}/destinations/crm`);
  await page.getByRole('button', { name: 'Pause' }).click();
  await page.waitForURL(/done=paused/);
  let api = await (await page.request.get(`${base}/admin/destinations/crm`)).json();
  check(api.status?.paused === true, 'pausing from the page paused it');
  check((await text(page, '[data-field=health]')) === 'paused', 'the page shows it paused');
  await page.getByRole('button', { name: 'Resume' }).click();
  await page.waitForURL(/done=resumed/);
  api = await (await page.request.get(`${base}/admin/destinations/crm`)).json();
  check(api.status?.paused === false, 'resuming from the page resumed it');

  // A form without its token changes nothing.
  const forged = await page.request.post(`${base}/destinations/crm/pause`, { form: { csrf: '0'.repeat(32) } });
  check(forged.status() === 403, `a form with a wrong token is refused (${forged.status()})`);
  api = await (await page.request.get(`${base}/admin/destinations/crm`)).json();
  check(api.status?.paused === false, 'the refused form paused nothing');
}

async function replayDeadLetters(page) {
  const url = `${base}/destinations/billing`;
  await page.goto(url);
  const before = Number(await text(page, '[data-field=dead-letter-count]'));
  check(before > 0, `billing has dead letters to replay (${before})`);
  check((await page.locator('table[data-field=dead-letter-list] tbody tr').count()) > 0, 'they are listed');
  seen.dead_letters = before;
  await page.getByRole('button', { name: 'Replay all' }).click();
  await page.waitForURL(/done=replayed/);
  seen.replay_notice = await text(page, '[data-field=notice]');
  check(seen.replay_notice.includes(`Replaying ${before}`), `the page says what it replayed: ${seen.replay_notice}`);
  await until(
    page,
    url,
    async (p) => Number(await text(p, '[data-field=dead-letter-count]')) === 0,
    "billing's dead letters to be delivered",
  );
  // An error body of markup, dead-lettered, shows as text.
  await page.goto(`${base}/destinations/markup`);
  const error = await text(page, 'table[data-field=dead-letter-list]');
  check(error.includes('<script>window.__xss=1</script>'), `the destination's error shows as text: ${error}`);
  check(error.includes('<script>window.__xss=3</script>'), `the payload shows as text: ${error}`);
  await fits(page, 'destination');
  await page.screenshot({ path: join(shots, 'console-destination.png'), fullPage: true });
  const markupLetters = Number(await text(page, '[data-field=dead-letter-count]'));
  await page.getByRole('button', { name: 'Purge all' }).click();
  await page.waitForURL(/done=purged/);
  const purged = await text(page, '[data-field=notice]');
  check(purged.startsWith(`Purged ${markupLetters} `), `the page says what it purged: ${purged}`);
  check(await page.locator('[data-field=no-dead-letters]').isVisible(), 'no dead letters are left');
}

async function deleteDestination(page) {
  await page.goto(`${base}/destinations/audit`);
  await page.getByLabel('Delete audit').check();
  await page.getByRole('button', { name: 'Delete destination' }).click();
  await page.waitForURL(/done=deleted/);
  check((await page.locator('article[data-destination=audit]').count()) === 0, 'the deleted destination is gone');
  const api = await page.request.get(`${base}/admin/destinations/audit`);
  check(api.status() === 404, `the API no longer has it (${api.status()})`);
}

const browser = await chromium.launch({ executablePath: args.chromium, args: ['--no-sandbox'] });
try {
  const context = await browser.newContext({
    viewport: { width: 1280, height: 800 },
    httpCredentials: { username: 'admin', password: args.token },
  });
  const page = await context.newPage();
  const flows = { eventsCounted, overview, createWithRefusal, eventAttempts, testEvent, pauseAndResume, replayDeadLetters, narrowAndKeyboard, deleteDestination };
  const only = args.only ? args.only.split(',') : Object.keys(flows);
  for (const name of only) {
    try {
      await flows[name](page);
    } catch (error) {
      const alerts = await page.locator('[role=alert]').allInnerTexts().catch(() => []);
      throw new Error(`flow ${name}: ${error.message}\n  at ${page.url()}; the page says: ${alerts.join(' | ') || 'nothing alarming'}`);
    }
  }
  seen.flows = only;
  console.log(JSON.stringify(seen));
} finally {
  await browser.close();
}
