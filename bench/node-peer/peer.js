// The benchmark's Node.js peer: what a team writes in 40 lines. ws + an amqplib confirm channel,
// at most 256 unconfirmed publishes in flight, persistent messages, no spool, no reconnects.
// Usage: PEER_REALM_KEY=... PEER_AMQP_URL=... node peer.js WS_URL EXCHANGE COUNT. Prints JSON lines.
'use strict';
const crypto = require('crypto');
const amqp = require('amqplib');
const WebSocket = require('ws');

const [url, exchange, count] = process.argv.slice(2);
const key = process.env.PEER_REALM_KEY, amqpUrl = process.env.PEER_AMQP_URL;
const total = Number(count), WINDOW = 256;
const say = (msg) => process.stdout.write(JSON.stringify(msg) + '\n');

(async () => {
  const conn = await amqp.connect(amqpUrl);
  const ch = await conn.createConfirmChannel();
  const ws = new WebSocket(url, { perMessageDeflate: false });
  const waiting = [];            // frames read while the window is full
  let inFlight = 0, published = 0, confirmed = 0, failed = 0;
  const pump = () => {
    while (inFlight < WINDOW && waiting.length) {
      const raw = waiting.shift();
      let frame;
      try { frame = JSON.parse(raw); } catch { continue; }   // text PING keepalive, junk
      if (!frame || frame.type !== 'notification') continue;
      const event = frame.event || (frame.data && frame.data.event);
      if (!event) continue;
      inFlight++; published++;
      ch.publish(exchange, event, raw, {
        persistent: true, contentType: 'application/json', appId: 'orangepill-node-peer',
        messageId: crypto.createHash('sha256').update(raw).digest('hex').slice(0, 32),
      }, (err) => {
        inFlight--; confirmed++; if (err) failed++;
        if (confirmed === total) say({ kind: 'published', published, failed });
        pump();
      });
    }
    if (waiting.length > WINDOW) ws.pause(); else ws.resume();
  };
  ws.on('open', () => { ws.send(JSON.stringify({ type: 'subscribe', realm: key })); say({ kind: 'ready', pid: process.pid }); });
  ws.on('message', (data) => { waiting.push(data); pump(); });
  ws.on('error', (err) => { say({ kind: 'error', error: String(err) }); process.exit(1); });
})().catch((err) => { say({ kind: 'error', error: String(err) }); process.exit(1); });
