// A second language's client for sendtime's gRPC interop tests
// (tests/interop/test_node_interop.py runs it). Its stubs are made at run time
// from protos/ alone, with @grpc/grpc-js and @grpc/proto-loader, so whatever
// the Python stubs take for granted is checked from outside.
//
//   node client.mjs TARGET CASE [ARG]
//
// TARGET is host:port of a running sendtime; CASE is one of CASES below. It
// prints one JSON line with what it saw (a status code, decoded error
// details, acks) and exits 0; the Python test judges it. The API key comes
// from SENDTIME_KEY (unset: no key is sent).

import path from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const PROTOS = path.resolve(here, "../../../protos");
// google/rpc/*.proto: the caller gives the folder (the Python tests pass the
// one googleapis-common-protos installed).
const GOOGLEAPIS = process.env.GOOGLEAPIS_PROTOS;
const [target, caseName, arg] = process.argv.slice(2);

const definition = protoLoader.loadSync(
  ["sendtime/v1/event_service.proto", "sendtime/v1/content_service.proto"],
  { includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);
const v1 = grpc.loadPackageDefinition(definition).sendtime.v1;

// google.rpc.Status and its details, decoded from grpc-status-details-bin.
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (_origin, target) => path.join(GOOGLEAPIS, target);
rpcTypes.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
rpcTypes.resolveAll();
const Status = rpcTypes.lookupType("google.rpc.Status");

function details(error) {
  const raw = error.metadata?.get("grpc-status-details-bin")?.[0];
  if (!raw) return null;
  const status = Status.decode(raw);
  const out = { code: status.code, message: status.message, details: [] };
  for (const any of status.details) {
    const typeName = any.type_url.split("/").pop();
    const decoded = rpcTypes.lookupType(typeName).toObject(rpcTypes.lookupType(typeName).decode(any.value));
    out.details.push({ type: typeName, ...decoded });
  }
  return out;
}

function metadata() {
  const md = new grpc.Metadata();
  if (process.env.SENDTIME_KEY) md.set("authorization", `Bearer ${process.env.SENDTIME_KEY}`);
  return md;
}

function outcome(error, extra = {}) {
  if (!error) return { code: 0, ...extra };
  return { code: error.code, status: grpc.status[error.code], message: error.details, rpc: details(error), ...extra };
}

function unary(client, method, request, options = {}) {
  return new Promise((resolve) => {
    client[method](request, metadata(), options, (error, response) => resolve({ error, response }));
  });
}

const events = () => new v1.EventService(target, grpc.credentials.createInsecure());
const content = () => new v1.ContentService(target, grpc.credentials.createInsecure());

function trackEvent(messageId, bytes = 0) {
  const properties = { product_id: "mug-ceramic", cart_id: "c-node", price: 12.5, quantity: 1 };
  if (bytes) properties.padding = "x".repeat(bytes);
  return {
    message_id: messageId,
    user_id: "node-user",
    track: { name: "Product Added", properties_json: Buffer.from(JSON.stringify(properties)) },
  };
}

// Reads and ends a StreamEvents call; resolves with its final status and the acks seen.
function streamUntilEnd(call, onAck = () => {}) {
  return new Promise((resolve) => {
    const acks = [];
    call.on("data", (response) => {
      acks.push(...response.acks);
      onAck(acks.length);
    });
    call.on("error", (error) => resolve(outcome(error, { acks: acks.length })));
    call.on("status", (status) => {
      if (status.code === grpc.status.OK) resolve({ code: 0, acks: acks.length });
    });
  });
}

const CASES = {
  async ingest_ok() {
    const { error, response } = await unary(events(), "IngestEvent", { event: trackEvent(`node-${Date.now()}`) });
    return outcome(error, { outcome: response?.ack?.outcome });
  },

  async bad_request_details() {
    // no message_id: the server must name the field in google.rpc.BadRequest
    const { error } = await unary(events(), "IngestEvent", { event: { ...trackEvent(""), message_id: "" } });
    return outcome(error);
  },

  async unauthenticated() {
    delete process.env.SENDTIME_KEY;
    const { error } = await unary(events(), "IngestEvent", { event: trackEvent("node-no-key") });
    return outcome(error);
  },

  async deadline_already_exceeded() {
    const { error } = await unary(content(), "GetContent", { user_id: "node-user", blocks: ["cart"] }, {
      deadline: Date.now() - 1,
    });
    return outcome(error);
  },

  async deadline_propagated() {
    // ARG: the deadline in ms. The server must answer within it, whatever its sources do.
    const budget = Number(arg);
    const started = process.hrtime.bigint();
    const { error, response } = await unary(content(), "GetContent", { user_id: "node-user", blocks: [
      "cart",
      "loyalty",
    ] }, { deadline: Date.now() + budget });
    const elapsedMs = Number(process.hrtime.bigint() - started) / 1e6;
    const blocks = Object.fromEntries((response?.blocks ?? []).map((b) => [b.name, [b.source, b.fallback_reason]]));
    return outcome(error, { elapsed_ms: elapsedMs, blocks });
  },

  async cancel_after_begin() {
    const call = events().StreamEvents(metadata());
    const ended = streamUntilEnd(call);
    call.cancel();
    return ended;
  },

  async cancel_after_first_response() {
    const call = events().StreamEvents(metadata());
    const ended = streamUntilEnd(call, () => call.cancel());
    call.write({ events: [trackEvent(`node-stream-${Date.now()}`)] });
    return ended;
  },

  async unimplemented() {
    const client = new grpc.Client(target, grpc.credentials.createInsecure());
    const identity = (value) => value;
    const call = (method) =>
      new Promise((resolve) =>
        client.makeUnaryRequest(method, identity, identity, Buffer.alloc(0), metadata(), (error) =>
          resolve(outcome(error)),
        ),
      );
    return {
      method: await call("/sendtime.v1.EventService/NoSuchMethod"),
      service: await call("/sendtime.v1.NoSuchService/Call"),
    };
  },

  async large_messages() {
    // ARG: the server's max message size in bytes.
    const limit = Number(arg);
    const client = events();
    // under the transport limit, over the per-event limit: an answer from sendtime naming the field
    const event = await unary(client, "IngestEvent", { event: trackEvent("node-big-event", 64 * 1024) });
    // over the transport limit: refused by the server before sendtime sees it
    const message = await unary(client, "IngestEvent", { event: trackEvent("node-huge", limit + 1024) });
    return { event: outcome(event.error), message: outcome(message.error) };
  },

  async drain() {
    // Streams events until the server ends the stream; says "streaming" once the
    // first ack came, so the test knows when to stop the server.
    const call = events().StreamEvents(metadata());
    let sent = 0;
    let told = false;
    const ended = streamUntilEnd(call, () => {
      if (!told) {
        told = true;
        process.stdout.write("streaming\n");
      }
    });
    const timer = setInterval(() => {
      sent += 1;
      call.write({ events: [trackEvent(`node-drain-${process.pid}-${sent}`)] });
    }, 5);
    const result = await ended;
    clearInterval(timer);
    return { ...result, sent };
  },
};

const run = CASES[caseName];
if (!run) {
  process.stderr.write(`unknown case ${caseName}; one of ${Object.keys(CASES).join(", ")}\n`);
  process.exit(2);
}
const watchdog = setTimeout(() => {
  process.stderr.write(`case ${caseName} did not finish in 20 s\n`);
  process.exit(3);
}, 20_000);
const result = await run();
clearTimeout(watchdog);
process.stdout.write(`${JSON.stringify(result)}\n`);
process.exit(0);
