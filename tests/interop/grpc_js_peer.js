// grpc-js (@grpc/grpc-js, pure JavaScript gRPC) peer for the interop tests: the greet service
// with raw bytes, no protoc. Same commands, method, message and output as grpcio_peer.py:
//
//   node grpc_js_peer.js server --name NAME --port PORT [--host IP]
//   node grpc_js_peer.js client --target HOST:PORT --runs R --calls N --concurrency C [--deadline-s S]
//
// The client prints one line:
//   RESULT {"ok": .., "failed": .., "errors": {status: count}, "by_server": {name: count}}
'use strict';

const grpc = require('@grpc/grpc-js');

const METHOD = '/greet.Greeter/SayHello';
const identity = (b) => b;
const definition = {
  SayHello: {
    path: METHOD,
    requestStream: false,
    responseStream: false,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
  },
};

function flags(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) {
      throw new Error(`bad argument ${argv[i]}`);
    }
    out[argv[i].slice(2)] = argv[i + 1];
  }
  return out;
}

function serve(name, host, port) {
  const server = new grpc.Server();
  server.addService(definition, {
    SayHello: (call, callback) => {
      callback(null, Buffer.concat([Buffer.from('hello '), call.request, Buffer.from(` from ${name}`)]));
    },
  });
  const addr = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
  server.bindAsync(addr, grpc.ServerCredentials.createInsecure(), (err) => {
    if (err) {
      console.error(`grpc-js server: cannot bind ${addr}: ${err.message}`);
      process.exit(1);
    }
    console.log('READY');
  });
}

async function client(target, runs, calls, concurrency, deadlineS) {
  const result = { ok: 0, failed: 0, errors: {}, by_server: {} };
  const Client = grpc.makeGenericClientConstructor(definition, 'greet.Greeter');
  for (let r = 0; r < runs; r++) {
    // A fresh client per run: its own channel, so its own HTTP/2 connection.
    const c = new Client(target, grpc.credentials.createInsecure(), {
      'grpc.use_local_subchannel_pool': 1,
    });
    const one = () => new Promise((resolve) => {
      const deadline = new Date(Date.now() + deadlineS * 1000);
      c.SayHello(Buffer.from('x'), { deadline }, (err, reply) => {
        if (err) {
          result.failed += 1;
          const key = `${grpc.status[err.code]}: ${err.details}`;
          result.errors[key] = (result.errors[key] || 0) + 1;
        } else {
          result.ok += 1;
          const server = reply.toString().split(' from ').pop();
          result.by_server[server] = (result.by_server[server] || 0) + 1;
        }
        resolve();
      });
    });
    const callers = [];
    for (let i = 0; i < concurrency; i++) {
      const share = Math.floor(calls / concurrency) + (i < calls % concurrency ? 1 : 0);
      callers.push((async () => {
        for (let k = 0; k < share; k++) await one();
      })());
    }
    await Promise.all(callers);
    c.close();
  }
  console.log(`RESULT ${JSON.stringify(result)}`);
}

const [cmd, ...rest] = process.argv.slice(2);
const f = flags(rest);
if (cmd === 'server') {
  serve(f.name, f.host || '::', Number(f.port));
} else if (cmd === 'client') {
  client(f.target, Number(f.runs || 1), Number(f.calls || 1000), Number(f.concurrency || 1),
    Number(f['deadline-s'] || 5)).then(() => process.exit(0));
} else {
  console.error(`grpc_js_peer.js: unknown command ${cmd}`);
  process.exit(2);
}
