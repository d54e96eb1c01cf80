// Drives the coordinator's dashboard in headless Chromium (playwright-core, the system's browser):
//   node dashboard.mjs URL TOKEN SCREENSHOT
// Prints "LOADED <rounds committed>" once the page has rendered the status, then waits (up to
// 60 s) for the page to show a later committed round by itself, and prints one JSON line with
// what it saw: the counts before and after, the committed rounds listed, the chart's bars, any
// request to another host, and any script error.
import { chromium } from "playwright-core";

const [url, token, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.STARLING_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  const host = new URL(url).host;
  const external = [];
  const errors = [];
  page.on("request", (r) => { if (new URL(r.url()).host !== host) external.push(r.url()); });
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("response", (r) => { if (r.status() >= 400) errors.push(`HTTP ${r.status()} for ${r.url()}`); });
  await page.goto(url + "#token=" + encodeURIComponent(token));
  await page.waitForFunction(() => /^\d+$/.test(document.getElementById("rounds-committed").textContent), null, { timeout: 30000 });
  const loaded = Number(await page.textContent("#rounds-committed"));
  console.log("LOADED " + loaded);
  await page.waitForFunction((n) => Number(document.getElementById("rounds-committed").textContent) > n, loaded, { timeout: 60000 });
  // The list refreshes with the same status: give it one more refresh to be sure both are drawn.
  await page.waitForTimeout(2500);
  const after = Number(await page.textContent("#rounds-committed"));
  const rows = await page.$$eval('#round-list tr[data-state="committed"]', (rs) => rs.map((r) => Number(r.dataset.round)));
  const bars = await page.$$eval("#rounds-chart g", (gs) => gs.length);
  const address = page.url();
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ loaded, after, rows, bars, external, errors, address }));
} finally {
  await browser.close();
}
