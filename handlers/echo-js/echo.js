// The echo handler in JavaScript: writes back exactly the bytes it reads,
// until the input ends, then flushes and returns.
//
// Built into a component of `host:handler/handler` by componentize-js
// (StarlingMonkey); see build.sh. The `wasi:io/streams` resources arrive as
// objects whose methods throw on `err`: the error's `payload` is the
// `stream-error` variant, `{ tag: 'closed' }` or
// `{ tag: 'last-operation-failed', val: <wasi:io/error.error> }`.

/** The most the handler asks for in one read. */
const READ_CHUNK = 64n * 1024n;

/** Whether `e` is the `closed` case of `stream-error`. */
function isClosed(e) {
  return e && e.payload && e.payload.tag === 'closed';
}

/** A one-line description of a `stream-error` thrown by a stream method. */
function describe(what, e) {
  if (isClosed(e)) return `${what}: the stream is closed`;
  const p = e && e.payload;
  if (p && p.tag === 'last-operation-failed' && p.val) {
    try {
      return `${what} failed: ${p.val.toDebugString()}`;
    } catch (_) {
      /* fall through */
    }
  }
  return `${what} failed: ${e}`;
}

/**
 * Writes all of `bytes`, waiting for the stream's permission between chunks
 * (`check-write`/`write`, not `blocking-write-and-flush`, which takes at most
 * 4,096 bytes a call).
 */
function writeAll(output, bytes) {
  let offset = 0;
  while (offset < bytes.length) {
    let permit;
    try {
      permit = output.checkWrite();
    } catch (e) {
      throw describe('check-write', e);
    }
    if (permit === 0n) {
      const pollable = output.subscribe();
      pollable.block();
      continue;
    }
    const n = Math.min(bytes.length - offset, Number(permit));
    try {
      output.write(bytes.subarray(offset, offset + n));
    } catch (e) {
      throw describe('write', e);
    }
    offset += n;
  }
}

/** The `handle` export: an `err` is a thrown string. */
export function handle(_info, input, output) {
  for (;;) {
    let bytes;
    try {
      bytes = input.blockingRead(READ_CHUNK);
    } catch (e) {
      if (isClosed(e)) break;
      throw describe('read', e);
    }
    writeAll(output, bytes);
  }
  try {
    output.blockingFlush();
  } catch (e) {
    throw describe('flush', e);
  }
}
