// Drives navi-trio with @ag-ui/client's HttpAgent and validates every event it reads
// with @ag-ui/core's EventSchemas. Prints one JSON object.
//
//   node ag-ui.mjs '{"base": "http://127.0.0.1:8000", "threadId": "t1", "text": "hi"}'
//
// Options: token, runId, stopAfter / abortAfter (an event type: on its first one,
// POST /sessions/{threadId}/stop, or abort the run as a closed tab would).
import { HttpAgent } from "@ag-ui/client";
import { EventSchemas } from "@ag-ui/core/schemas";

const opts = JSON.parse(process.argv[2]);
const headers = opts.token ? { Authorization: `Bearer ${opts.token}` } : {};
const out = { events: [], invalid: [] };

const agent = new HttpAgent({
  url: `${opts.base}/ag-ui`,
  headers,
  threadId: opts.threadId,
  initialMessages: [{ id: "user-1", role: "user", content: opts.text }],
});

const seen = new Set();
const subscriber = {
  async onEvent({ event }) {
    out.events.push(event);
    const check = EventSchemas.safeParse(event);
    if (!check.success) out.invalid.push({ event, error: String(check.error) });
    const first = !seen.has(event.type);
    seen.add(event.type);
    if (first && event.type === opts.stopAfter) {
      const r = await fetch(`${opts.base}/sessions/${opts.threadId}/stop`, { method: "POST", headers });
      out.stop = await r.json();
    }
    if (first && event.type === opts.abortAfter) {
      out.aborted = true;
      agent.abortRun();
    }
  },
  onRunFinishedEvent({ outcome }) {
    out.outcome = outcome;
  },
  onRunErrorEvent({ event }) {
    out.runError = event.message;
  },
};

try {
  const result = await agent.runAgent({ runId: opts.runId ?? "run-1" }, subscriber);
  out.result = result.result ?? null;
  out.newMessages = result.newMessages;
} catch (e) {
  out.error = String(e?.message ?? e);
}
out.messages = agent.messages;
console.log(JSON.stringify(out));
