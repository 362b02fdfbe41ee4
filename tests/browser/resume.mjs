// Reloads the gateway page in the middle of the 1000-mail demo and checks that the demo goes
// on where it was: after the reload the count starts from what the page had (not from 0),
// only rises, reaches 1000 with 0 failures, and no result is counted twice.
//
//   RESUME_SIGNAL=/tmp/file node tests/browser/resume.mjs URL OUTPUT.png
//
// Just before the reload it writes "reloading" to RESUME_SIGNAL, so that whoever plays the
// workers can answer more tasks while the page is away, and "resumed" once the page is back,
// for the rest to come while it watches. Exit status 0 on success; otherwise
// the reason is printed on stderr. Run by the Rust test
// resume::the_page_reloaded_mid_demo_continues_in_chromium (tests/e2e/resume.rs).
import { writeFileSync } from "node:fs";
import { chromium } from "playwright-core";

const [url, output] = process.argv.slice(2);
const signal = process.env.RESUME_SIGNAL;
if (!url || !output || !signal) {
  console.error("usage: RESUME_SIGNAL=FILE node resume.mjs URL OUTPUT.png");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync",
  ],
});
const count = (page) => page.evaluate(() => Number(document.getElementById("demo-done").textContent));
try {
  const page = await browser.newPage({ viewport: { width: 412, height: 915 } });
  page.on("console", (m) => console.error(`[page ${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => console.error(`[page error] ${e.message}`));
  await page.goto(url);
  await page.waitForSelector("#status.on", { timeout: 30_000 });
  await page.click("#demo");
  await page.waitForFunction(() => Number(document.getElementById("demo-done").textContent) >= 300,
    null, { timeout: 120_000 });
  const before = await count(page);
  writeFileSync(signal, "reloading");
  await page.reload();
  await page.waitForSelector('#demo-state[data-state="running"], #demo-state[data-state="done"]',
    { state: "attached", timeout: 30_000 });
  const after = await count(page);
  writeFileSync(signal, "resumed");
  // The page saves its count with its token at most 100 ms apart: a reload may lose the last
  // few, which the resume then replays.
  if (after < Math.min(before, 300) || after === 0) {
    throw new Error(`the count started again from ${after} after the reload (it was ${before})`);
  }
  let last = after, drops = 0, rises = 0;
  const until = Date.now() + 120_000;
  for (;;) {
    const state = await page.getAttribute("#demo-state", "data-state");
    const now = await count(page);
    if (now < last) drops++;
    if (now > last) rises++;
    last = now;
    if (state === "done") break;
    if (Date.now() > until) throw new Error(`stuck at ${now} results`);
    await page.waitForTimeout(50);
  }
  const done = await page.textContent("#demo-done");
  const failed = await page.textContent("#demo-failed");
  const duplicates = await page.getAttribute("#demo-state", "data-duplicates");
  console.log(`resume: ${before} before the reload, ${after} after it, rising ${rises} times to ${done} results, ${failed} failures, ${duplicates} duplicates`);
  await page.screenshot({ path: output, fullPage: true });
  if (done !== "1000" || failed !== "0" || duplicates !== "0" || drops !== 0 || after >= 1000 || rises < 3) {
    console.error(`expected 1000 results, 0 failures, 0 duplicates and a count that rises after the reload; got ${done}, ${failed}, ${duplicates}, ${drops} drops, ${after} after the reload, ${rises} rises`);
    process.exitCode = 1;
  }
} finally {
  await browser.close();
}
