// Drives navi-trio with the `ai` package's own client side: DefaultChatTransport (what
// useChat uses) to send and to resume, readUIMessageStream to build the answer, and the
// package's uiMessageChunkSchema to validate every chunk. Prints one JSON object.
//
//   node ai-sdk.mjs '{"base": "http://127.0.0.1:8000", "id": "chat1", "text": "hi"}'
//
// Options: token, action ("send" | "resume"), files ([{mediaType, filename, url}]),
// stopAfter / abortAfter (a chunk type: on its first one, POST /sessions/{id}/stop, or
// abort the request as a closed tab would).
import { DefaultChatTransport, readUIMessageStream, uiMessageChunkSchema } from "ai";
import { safeValidateTypes } from "@ai-sdk/provider-utils";

const opts = JSON.parse(process.argv[2]);
const headers = opts.token ? { Authorization: `Bearer ${opts.token}` } : {};
const out = { chunks: [], invalid: [], status: null, streamHeader: null };

const transport = new DefaultChatTransport({
  api: `${opts.base}/api/chat`,
  headers,
  // Only to record what the server answered; the request is the transport's own.
  fetch: async (url, init) => {
    const response = await fetch(url, init);
    out.status = response.status;
    out.streamHeader = response.headers.get("x-vercel-ai-ui-message-stream");
    return response;
  },
});

const abort = new AbortController();
const seen = new Set();
const record = new TransformStream({
  async transform(chunk, controller) {
    out.chunks.push(chunk);
    const check = await safeValidateTypes({ value: chunk, schema: uiMessageChunkSchema });
    if (!check.success) out.invalid.push({ chunk, error: String(check.error) });
    const first = !seen.has(chunk.type);
    seen.add(chunk.type);
    controller.enqueue(chunk);
    if (first && chunk.type === opts.stopAfter) {
      const r = await fetch(`${opts.base}/sessions/${opts.id}/stop`, { method: "POST", headers });
      out.stop = await r.json();
    }
    if (first && chunk.type === opts.abortAfter) {
      out.aborted = true;
      abort.abort();
    }
  },
});

try {
  let stream;
  if ((opts.action ?? "send") === "resume") {
    stream = await transport.reconnectToStream({ chatId: opts.id, abortSignal: abort.signal });
  } else {
    const parts = [{ type: "text", text: opts.text }, ...(opts.files ?? []).map((f) => ({ type: "file", ...f }))];
    stream = await transport.sendMessages({
      chatId: opts.id,
      messages: [{ id: "user-1", role: "user", parts }],
      trigger: "submit-message",
      messageId: undefined,
      abortSignal: abort.signal,
    });
  }
  if (stream === null) {
    out.resumed = false; // the transport's answer to 204: nothing to resume
  } else {
    const errors = [];
    let message = null;
    for await (const snapshot of readUIMessageStream({
      stream: stream.pipeThrough(record),
      onError: (e) => errors.push(String(e.message ?? e)),
    })) {
      message = snapshot;
    }
    out.message = message;
    out.errors = errors;
  }
} catch (e) {
  out.error = String(e?.message ?? e);
}
console.log(JSON.stringify(out));
