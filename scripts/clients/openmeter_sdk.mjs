// OpenMeter's official Node SDK (@openmeter/sdk) against meterbridge's OpenMeter-compatible API,
// unchanged: CloudEvents in through `events.ingest` (one event, a batch, a replay of both, a
// conflicting resend refused whole), usage out through `meters.query`. Prints the total it sent,
// as JSON, for the caller to check against /v1/usage/summary.
//
// Environment: MB_URL (the API's base URL), MB_KEY (an internal API key), MB_RUN (unique per run),
// MB_METER (the meter's slug; it counts CloudEvents of type MB_TYPE, quantity at $.tokens,
// groupBy model at $.model).
import assert from 'node:assert/strict'
import { OpenMeter } from '@openmeter/sdk'

const { MB_URL, MB_KEY, MB_RUN, MB_METER, MB_TYPE } = process.env
const openmeter = new OpenMeter({ baseUrl: MB_URL, apiKey: MB_KEY })
const started = new Date(Date.now() - 60_000)
// The instant each event happened, as an emitter records it: a replay resends the same event.
// (The SDK stamps an event without `time` at each send, and the same id and source with another
// time is a conflict, not a duplicate.)
const time = new Date()

const event = (n, tokens) => ({
  id: `${MB_RUN}-node-${n}`,
  source: 'openmeter-node-sdk',
  type: MB_TYPE,
  subject: `customer-${n % 3}`,
  time,
  data: { tokens, model: n % 2 ? 'big' : 'small' },
})
const single = event(0, 5)
const batch = Array.from({ length: 50 }, (_, i) => event(i + 1, i + 1))
const expected = 5 + (50 * 51) / 2

await openmeter.events.ingest(single)
await openmeter.events.ingest(batch)
// A replay — a retry after a lost response — is accepted and changes nothing.
await openmeter.events.ingest(single)
await openmeter.events.ingest(batch)
// The same id with other content: the whole request is refused, nothing of it stored.
await assert.rejects(
  openmeter.events.ingest([event(100, 7), { ...event(1, 999) }]),
  (e) => e.status === 409 && /conflicting_events/.test(e.type),
)
// An event of a type no meter counts: refused whole.
await assert.rejects(
  openmeter.events.ingest({ ...event(101, 1), type: 'no-such-meter' }),
  (e) => e.status === 400,
)

const to = new Date(Date.now() + 60_000)
const total = await openmeter.meters.query(MB_METER, { from: started, to })
assert.equal(total.data.length, 1, JSON.stringify(total))
assert.equal(total.data[0].value, expected)
assert.ok(total.data[0].windowStart instanceof Date, 'dates decode as OpenMeter answers them')

const perModel = await openmeter.meters.query(MB_METER, {
  from: started, to, windowSize: 'HOUR', groupBy: ['model'], windowTimeZone: 'UTC',
})
const byModel = {}
for (const row of perModel.data) byModel[row.groupBy.model] = (byModel[row.groupBy.model] ?? 0) + row.value
// Even ids (and the single event) are model small, odd ones big.
assert.deepEqual(byModel, { small: 5 + 650, big: 625 })

const perSubject = await openmeter.meters.query(MB_METER, { from: started, to, subject: ['customer-0'] })
assert.ok(perSubject.data.every((row) => row.subject === 'customer-0'), JSON.stringify(perSubject))

console.log(JSON.stringify({ client: '@openmeter/sdk', events: 51, total: expected }))
