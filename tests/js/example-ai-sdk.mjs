// The docs' AI SDK example (docs/ai-sdk.md), run by tests/test_protocol_clients.py.
// useChat does the same with these two pieces: its transport, and the stream reader.
import { DefaultChatTransport, readUIMessageStream } from "ai";

const base = process.argv[2] ?? "http://127.0.0.1:8000";
const transport = new DefaultChatTransport({
  api: `${base}/api/chat`,
  headers: process.env.NAVI_TOKEN ? { Authorization: `Bearer ${process.env.NAVI_TOKEN}` } : {},
});

const stream = await transport.sendMessages({
  chatId: "my-first-chat", // the navi-trio session: created if it does not exist
  messages: [{ id: "m1", role: "user", parts: [{ type: "text", text: "hello from the AI SDK" }] }],
  trigger: "submit-message",
  messageId: undefined,
  abortSignal: undefined,
});

for await (const message of readUIMessageStream({ stream })) {
  const text = message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
  if (text) process.stdout.write(`\r${text}`);
}
process.stdout.write("\n");
