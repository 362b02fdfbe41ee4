// Loads the gateway page in Debian's headless Chromium, runs the 1000-mail demo and checks that
// the progress reaches 1000 with 0 failures; saves a screenshot.
//
//   [WARREN_TOKEN=token] node tests/browser/page.mjs URL OUTPUT.png
//
// With WARREN_TOKEN, the gateway is expected to require it: the page must ask for it (its
// /api/info answers 401 without it), and the script types it in as a user would.
//
// Exit status 0 on success; otherwise the reason is printed on stderr. Run by the Rust test
// gateway::page_runs_the_1000_mail_demo_in_chromium (tests/e2e/gateway.rs).
import { chromium } from "playwright-core";

const [url, output] = process.argv.slice(2);
if (!url || !output) {
  console.error("usage: node page.mjs URL OUTPUT.png");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync",
  ],
});
try {
  // A phone-sized viewport: the page must be readable there.
  const page = await browser.newPage({ viewport: { width: 412, height: 915 }, deviceScaleFactor: 2 });
  page.on("console", (m) => console.error(`[page ${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => console.error(`[page error] ${e.message}`));
  await page.goto(url);
  if (process.env.WARREN_TOKEN) {
    await page.waitForSelector("#auth-box", { state: "visible", timeout: 30_000 });
    await page.fill("#token", process.env.WARREN_TOKEN);
    await page.click("#token-save");
  }
  await page.waitForSelector("#status.on", { timeout: 30_000 });
  // The live queue view shows the worker.
  await page.waitForFunction(() => Number(document.getElementById("queue-consumers").textContent) >= 1,
    null, { timeout: 30_000 });

  // A single task through the form.
  await page.fill("#function", "echo");
  await page.fill("#args", '{"hello": "from chromium"}');
  await page.click("#submit");
  await page.waitForFunction(() => document.getElementById("task-result").textContent.includes("from chromium"),
    null, { timeout: 30_000 });

  // The motivating example.
  const started = Date.now();
  await page.click("#demo");
  await page.waitForSelector('#demo-state[data-state="done"]', { timeout: 120_000 });
  const done = await page.textContent("#demo-done");
  const failed = await page.textContent("#demo-failed");
  const rate = await page.textContent("#demo-rate");
  console.log(`demo: ${done} results, ${failed} failures, ${rate} tasks/s, ${Date.now() - started} ms`);
  await page.screenshot({ path: output, fullPage: true });
  if (done !== "1000" || failed !== "0") {
    console.error(`expected 1000 results and 0 failures, got ${done} and ${failed}`);
    process.exitCode = 1;
  }
} finally {
  await browser.close();
}
