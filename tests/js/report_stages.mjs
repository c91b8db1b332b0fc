// A stage service written in JavaScript: reports the "geo" stage of each operation through
// kvstate's write service (NATS request/reply), as a service that cannot use the Python
// client would. Each operation gets its start, its success, the success again (a
// redelivered message: a duplicate) and a late start of the finished attempt (stale).
// Prints one JSON object of counts by outcome and error code.
import { connect, headers } from "@nats-io/transport-node";

const [servers, bucket, ids] = [process.env.NATS_URL, process.env.KVSTATE_BUCKET, process.env.OP_IDS.split(",")];
const nc = await connect({ servers: servers.split(",") });
const enc = new TextEncoder();
const counts = {};
const count = (key) => { counts[key] = (counts[key] ?? 0) + 1; };

async function report(id, event, ifMatch) {
  const h = headers();
  if (ifMatch !== undefined) h.set("If-Match", String(ifMatch));
  const msg = await nc.request(`kvstate.${bucket}.apply.${id}`, enc.encode(JSON.stringify(event)), { timeout: 10000, headers: h });
  const reply = msg.json();
  if (msg.headers.get("Kvstate-Status") !== (reply.error ? reply.error.code : "OK")) count("status-header-mismatch");
  count(reply.error ? reply.error.code : reply.outcome);
  return reply;
}

await Promise.all(ids.map(async (id) => {
  const started = await report(id, { type: "start", stage: "geo", worker: "geo-js", event_id: `${id}:geo:start` });
  await report(id, { type: "succeed", stage: "geo", worker: "geo-js", metadata: { country: "NL", by: "js" }, event_id: `${id}:geo:done` });
  await report(id, { type: "succeed", stage: "geo", worker: "geo-js", event_id: `${id}:geo:done` });
  await report(id, { type: "start", stage: "geo", worker: "geo-js", attempt: 1, event_id: `${id}:geo:late` });
  await report(id, { type: "merge", patch: { js: true }, event_id: `${id}:geo:meta` }, started.revision); // If-Match a revision long gone
}));
await report(ids[0], { type: "start", stage: "nope", event_id: "bad-stage" });
await nc.drain();
process.stdout.write(JSON.stringify(counts) + "\n");
