#!/usr/bin/env node
// A runyard client in Node.js, built only on the .proto files of the
// repository (protos/) with @grpc/grpc-js and @grpc/proto-loader.
//
// It sends one message (GatewayService/SendMessage), prints the agent's reply
// as it streams, and, when the stream is lost before the run ended, resumes
// with GatewayService/JoinRun(run_id, after_seq) from the last event it saw:
// no gap, no duplicate. --drop-after N cancels the stream after event N to
// show the resume.
//
// With --tools it offers the agent a client-side tool, `clock`, and talks
// over the bidirectional GatewayService/Chat stream instead: when the model
// calls the tool, the run waits (a `requires_action` event); this client
// computes the result and answers on the same stream
// (ChatRequest.submit_tool_results), and the run goes on. After a resume
// (JoinRun) it answers with the unary GatewayService/SubmitToolResults.
//
//   npm ci
//   node client.js --session demo "hello there"
//   node client.js --address 127.0.0.1:50051 --session demo --drop-after 3 --events "hello there"
//   node client.js --tools --session demo "What time is it?"
//
// Exit code: 0 when the run completed, 1 when it failed or was cancelled,
// 2 on a usage error or a call the gateway refused (the error's code and
// reason are printed).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const USAGE = `usage: node client.js [options] TEXT...

options:
  --address HOST:PORT   gateway address (default: $RUNYARD_GATEWAY or 127.0.0.1:50051)
  --session KEY         session key (default: node-demo)
  --agent ID            agent id (default: the gateway's default agent)
  --api-key KEY         API key (default: $RUNYARD_API_KEY; none = anonymous)
  --ca FILE             use TLS, trusting this CA certificate (PEM)
  --protos DIR          directory holding runyard/v1/*.proto (default: the repository's protos/)
  --drop-after N        cancel the stream after event seq N, then resume with JoinRun
  --tools               offer a client-side tool (clock) and answer its calls over Chat
  --events              print every event as a JSON line on stderr
  --timeout S           give up after S seconds (default 120)`;

function parseArgs(argv) {
  const options = {
    address: process.env.RUNYARD_GATEWAY || '127.0.0.1:50051',
    session: 'node-demo',
    agent: '',
    apiKey: process.env.RUNYARD_API_KEY || '',
    ca: '',
    protos: process.env.RUNYARD_PROTOS || path.resolve(__dirname, '..', '..', 'protos'),
    dropAfter: 0,
    events: false,
    tools: false,
    timeoutS: 120,
    text: [],
  };
  const valued = {
    '--address': 'address', '--session': 'session', '--agent': 'agent', '--api-key': 'apiKey',
    '--ca': 'ca', '--protos': 'protos', '--drop-after': 'dropAfter', '--timeout': 'timeoutS',
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') {
      console.log(USAGE);
      process.exit(0);
    } else if (arg === '--events') {
      options.events = true;
    } else if (arg === '--tools') {
      options.tools = true;
    } else if (valued[arg]) {
      if (i + 1 >= argv.length) throw new UsageError(`${arg} needs a value`);
      options[valued[arg]] = argv[++i];
    } else if (arg.startsWith('--')) {
      throw new UsageError(`unknown option ${arg}`);
    } else {
      options.text.push(arg);
    }
  }
  options.dropAfter = Number(options.dropAfter);
  options.timeoutS = Number(options.timeoutS);
  if (!Number.isInteger(options.dropAfter) || options.dropAfter < 0) throw new UsageError('--drop-after must be a whole number');
  if (!(options.timeoutS > 0)) throw new UsageError('--timeout must be a positive number of seconds');
  if (options.text.length === 0) throw new UsageError('no message text given');
  return options;
}

class UsageError extends Error {}

// ------------------------------------------------------------------ contract

function loadGateway(protoDir) {
  const file = path.join(protoDir, 'runyard', 'v1', 'gateway.proto');
  if (!fs.existsSync(file)) throw new UsageError(`${file} not found (use --protos DIR)`);
  const definition = protoLoader.loadSync(file, {
    includeDirs: [protoDir],
    keepCase: true, // field names exactly as in the .proto files: run_id, after_seq
    longs: String, // uint64 (seq, token counts) as decimal strings: no precision loss
    enums: String,
    defaults: true,
    oneofs: true, // event.event names the member of the RunEvent oneof that is set
  });
  return grpc.loadPackageDefinition(definition).runyard.v1.GatewayService;
}

// Errors carry a google.rpc.Status in the grpc-status-details-bin trailer with
// an ErrorInfo (reason, metadata) and, when waiting helps, a RetryInfo.
const RPC_TYPES = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
  message Duration { int64 seconds = 1; int32 nanos = 2; }
  message RetryInfo { Duration retry_delay = 1; }
`, { keepCase: true }).root;

function errorDetails(error) {
  const details = { reason: '', metadata: {}, retryAfterS: null };
  const raw = error.metadata && error.metadata.get('grpc-status-details-bin');
  if (!raw || raw.length === 0) return details;
  const status = RPC_TYPES.lookupType('google.rpc.Status').decode(raw[0]);
  for (const any of status.details) {
    if (any.type_url.endsWith('/google.rpc.ErrorInfo')) {
      const info = RPC_TYPES.lookupType('google.rpc.ErrorInfo').decode(any.value);
      details.reason = info.reason;
      details.metadata = info.metadata;
    } else if (any.type_url.endsWith('/google.rpc.RetryInfo')) {
      const retry = RPC_TYPES.lookupType('google.rpc.RetryInfo').decode(any.value);
      const delay = retry.retry_delay || {};
      details.retryAfterS = Number(delay.seconds || 0) + (delay.nanos || 0) / 1e9;
    }
  }
  return details;
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

// ------------------------------------------------------------------ the client-side tool

// Declared with the message (RunOptions.client_tools); the schema is JSON Schema text.
const CLOCK = {
  name: 'clock',
  description: "The current date and time on the user's machine, in an IANA time zone (default UTC).",
  parameters_json_schema: JSON.stringify({
    type: 'object',
    properties: { tz: { type: 'string', description: 'IANA time zone, e.g. Europe/Paris' } },
    additionalProperties: false,
  }),
};

// The result of one call: ToolOutput {tool_call_id, content, is_error}.
function answerCall(call) {
  try {
    if (call.name !== 'clock') throw new Error(`unknown tool ${call.name}`);
    const args = JSON.parse(call.arguments_json || '{}');
    const tz = args.tz || 'UTC';
    const time = new Intl.DateTimeFormat('en-GB', { timeZone: tz, dateStyle: 'full', timeStyle: 'long' }).format(new Date());
    return { tool_call_id: call.id, content: JSON.stringify({ time, tz }), is_error: false };
  } catch (error) {
    return { tool_call_id: call.id, content: JSON.stringify({ error: error.message }), is_error: true };
  }
}

// ------------------------------------------------------------------ the run

const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

// Prints one stream's events. Resolves with {done: true, exitCode} when the
// run ended, or {done: false, why} when the stream ended first (so the caller
// resumes); rejects with the gRPC error otherwise. `submit(runId, results)`
// sends the results of client tool calls (on a requires_action event).
function follow(call, via, state, options, submit) {
  return new Promise((resolve, reject) => {
    let settled = false;
    const settle = (fn, value) => {
      if (!settled) {
        settled = true;
        fn(value);
      }
    };
    call.on('data', (event) => {
      if (settled) return;
      const seq = Number(event.seq);
      if (seq <= state.lastSeq) return; // never print an event twice
      if (seq !== state.lastSeq + 1) {
        process.stderr.write(`warning: events ${state.lastSeq + 1}..${seq - 1} are missing\n`);
      }
      state.runId = event.run_id;
      state.lastSeq = seq;
      const kind = event.event;
      if (options.events) {
        process.stderr.write(JSON.stringify({ seq, kind, via, run_id: event.run_id }) + '\n');
      }
      const exitCode = show(kind, event[kind], state);
      if (kind === 'requires_action') {
        const results = event.requires_action.tool_calls.map(answerCall);
        for (const result of results) process.stderr.write(`[tool result ${result.tool_call_id}: ${result.content}]\n`);
        submit(event.run_id, results);
      }
      if (TERMINAL.has(kind)) {
        settle(resolve, { done: true, exitCode });
        return;
      }
      if (options.dropAfter && seq >= options.dropAfter && !state.dropped) {
        // Simulate a lost connection: cancel the call, then resume from here.
        state.dropped = true;
        call.cancel();
        settle(resolve, { done: false, why: `dropped on purpose after seq ${seq}` });
      }
    });
    call.on('error', (error) => {
      if (error.code === grpc.status.CANCELLED && state.dropped) {
        settle(resolve, { done: false, why: 'cancelled' });
      } else if (error.code === grpc.status.UNAVAILABLE && state.runId) {
        // e.g. the gateway is draining: resume on another replica.
        const details = errorDetails(error);
        settle(resolve, { done: false, why: `UNAVAILABLE ${details.reason}`.trim(), retryAfterS: details.retryAfterS });
      } else {
        settle(reject, error);
      }
    });
    call.on('end', () => settle(resolve, { done: false, why: 'the stream ended before the run did' }));
  });
}

function show(kind, body, state) {
  switch (kind) {
    case 'queued':
      process.stderr.write(`[run ${state.runId} queued]\n`);
      return null;
    case 'started':
      if (body.attempt > 1) {
        process.stderr.write(`\n[run restarted (attempt ${body.attempt}); discarding the partial answer]\n`);
        state.text = '';
      }
      process.stderr.write(`[started on ${body.worker_id || '?'} with ${body.model || '?'}]\n`);
      return null;
    case 'requires_action':
      for (const call of body.tool_calls) {
        process.stderr.write(`\n[tool call ${call.id}: ${call.name} ${call.arguments_json || '{}'}]\n`);
      }
      return null;
    case 'model_failover':
      process.stderr.write(`\n[failover ${body.from_model} -> ${body.to_model}: ${body.reason}]\n`);
      if (body.restart_output) state.text = '';
      return null;
    case 'text_delta':
      state.text += body.text;
      process.stdout.write(body.text);
      return null;
    case 'completed': {
      process.stdout.write('\n');
      const usage = body.usage || {};
      process.stderr.write(
        `[completed by ${body.model}: ${usage.input_tokens || 0} tokens in, ${usage.output_tokens || 0} out]\n`,
      );
      return 0;
    }
    case 'failed': {
      const error = body.error || {};
      process.stderr.write(`\nrun failed: ${error.code} ${error.reason}: ${error.message}\n`);
      return 1;
    }
    case 'cancelled':
      process.stderr.write(`\n[run cancelled: ${body.reason}]\n`);
      return 1;
    default:
      return null; // usage, tool calls, model_select: not shown
  }
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const GatewayService = loadGateway(options.protos);
  const credentials = options.ca
    ? grpc.credentials.createSsl(fs.readFileSync(options.ca))
    : grpc.credentials.createInsecure();
  const client = new GatewayService(options.address, credentials);
  const metadata = new grpc.Metadata();
  if (options.apiKey) metadata.set('authorization', `Bearer ${options.apiKey}`);
  const started = Date.now();
  const deadline = () => new Date(started + options.timeoutS * 1000);

  const state = { runId: '', lastSeq: 0, text: '', dropped: false };
  const request = {
    session_key: options.session,
    agent_id: options.agent,
    text: options.text.join(' '),
    // A retried SendMessage with the same key returns the same run.
    idempotency_key: crypto.randomUUID(),
    options: options.tools ? { client_tools: [CLOCK] } : undefined,
  };
  // Tool results for a run followed on SendMessage or JoinRun: the unary call.
  const submitUnary = (runId, results) => {
    client.SubmitToolResults({ run_id: runId, results }, metadata, { deadline: deadline() }, (error) => {
      if (error) process.stderr.write(`error: SubmitToolResults: ${statusName(error.code)}: ${error.details}\n`);
    });
  };
  let result;
  if (options.tools) {
    // One bidirectional Chat stream: the message, then the tool results, on the same call.
    const chat = client.Chat(metadata, { deadline: deadline() });
    chat.write({ send: request });
    const submitOnChat = (runId, results) => chat.write({ submit_tool_results: { run_id: runId, results } });
    result = await follow(chat, 'Chat', state, options, submitOnChat);
    chat.end();
  } else {
    result = await follow(client.SendMessage(request, metadata, { deadline: deadline() }), 'SendMessage', state, options, submitUnary);
  }
  for (let resumes = 1; !result.done; resumes++) {
    if (!state.runId) throw new Error(`the stream ended (${result.why}) before the run was created`);
    if (resumes > 10) throw new Error(`gave up after ${resumes - 1} resumes`);
    process.stderr.write(
      `\n[stream lost (${result.why}); resuming with JoinRun(run_id=${state.runId}, after_seq=${state.lastSeq})]\n`,
    );
    if (result.retryAfterS) await new Promise((r) => setTimeout(r, result.retryAfterS * 1000));
    const join = client.JoinRun({ run_id: state.runId, after_seq: String(state.lastSeq) }, metadata, { deadline: deadline() });
    result = await follow(join, 'JoinRun', state, options, submitUnary);
  }
  client.close();
  return result.exitCode;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    if (error instanceof UsageError) {
      process.stderr.write(`${error.message}\n\n${USAGE}\n`);
    } else if (error.code !== undefined && error.details !== undefined) {
      const details = errorDetails(error);
      const reason = details.reason ? ` ${details.reason}` : '';
      const field = details.metadata.field ? ` (field ${details.metadata.field})` : '';
      process.stderr.write(`error: ${statusName(error.code)}${reason}: ${error.details}${field}\n`);
    } else {
      process.stderr.write(`error: ${error.message}\n`);
    }
    process.exitCode = 2;
  },
);
