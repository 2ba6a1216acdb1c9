// The docs' AG-UI example (docs/ag-ui.md), run by tests/test_protocol_clients.py.
import { HttpAgent } from "@ag-ui/client";

const base = process.argv[2] ?? "http://127.0.0.1:8000";
const agent = new HttpAgent({
  url: `${base}/ag-ui`,
  headers: process.env.NAVI_TOKEN ? { Authorization: `Bearer ${process.env.NAVI_TOKEN}` } : {},
  threadId: "my-first-thread", // the navi-trio session: created if it does not exist
  initialMessages: [{ id: "m1", role: "user", content: "hello from AG-UI" }],
});

await agent.runAgent(
  {},
  {
    onTextMessageContentEvent: ({ event }) => process.stdout.write(event.delta),
    onToolCallResultEvent: ({ event }) => console.error(`[tool result] ${event.content}`),
    onRunFinishedEvent: ({ outcome }) => console.error(`[run finished: ${outcome}]`),
    onRunErrorEvent: ({ event }) => console.error(`[run error: ${event.message}]`),
  },
);
process.stdout.write("\n");
