;; The echo handler as a hand-written core module: writes back exactly the
;; bytes it reads, until the input ends, then flushes and returns.
;;
;; build.sh embeds the `host:handler/handler` world into it
;; (`wasm-tools component embed`) and wraps it into a component
;; (`wasm-tools component new`). The imports and exports below follow the
;; canonical ABI's core signatures for that world.
;;
;; Memory layout:
;;   0..16      return area of the imported stream methods
;;   16..32     return area of `handle` (result<_, string>)
;;   32..256    the error messages
;;   4096..     a bump heap for `cabi_realloc` (the connection-info strings
;;              and each chunk `blocking-read` returns); reset after each chunk
(module
  ;; blocking-read(self, len, retptr): result<list<u8>, stream-error>
  ;;   at retptr: u8 tag (0 ok, 1 err); ok: ptr at +4, len at +8;
  ;;   err: u8 stream-error tag at +4 (0 last-operation-failed, 1 closed), handle at +8
  (import "wasi:io/streams@0.2.12" "[method]input-stream.blocking-read"
    (func $blocking_read (param i32 i64 i32)))
  ;; check-write(self, retptr): result<u64, stream-error>
  ;;   at retptr: u8 tag; ok: u64 at +8; err: u8 stream-error tag at +8, handle at +12
  (import "wasi:io/streams@0.2.12" "[method]output-stream.check-write"
    (func $check_write (param i32 i32)))
  ;; write(self, ptr, len, retptr): result<_, stream-error>
  ;;   at retptr: u8 tag; err: u8 stream-error tag at +4, handle at +8
  (import "wasi:io/streams@0.2.12" "[method]output-stream.write"
    (func $write (param i32 i32 i32 i32)))
  ;; blocking-flush(self, retptr): result<_, stream-error>, as write
  (import "wasi:io/streams@0.2.12" "[method]output-stream.blocking-flush"
    (func $blocking_flush (param i32 i32)))
  ;; subscribe(self) -> own<pollable>
  (import "wasi:io/streams@0.2.12" "[method]output-stream.subscribe"
    (func $subscribe (param i32) (result i32)))
  (import "wasi:io/streams@0.2.12" "[resource-drop]input-stream"
    (func $drop_input (param i32)))
  (import "wasi:io/streams@0.2.12" "[resource-drop]output-stream"
    (func $drop_output (param i32)))
  (import "wasi:io/poll@0.2.12" "[method]pollable.block"
    (func $block (param i32)))
  (import "wasi:io/poll@0.2.12" "[resource-drop]pollable"
    (func $drop_pollable (param i32)))
  (import "wasi:io/error@0.2.12" "[resource-drop]error"
    (func $drop_error (param i32)))

  (memory (export "memory") 2)

  (global $heap (mut i32) (i32.const 4096))

  (data (i32.const 32) "read failed")         ;; 11 bytes
  (data (i32.const 48) "write failed")        ;; 12 bytes
  (data (i32.const 64) "flush failed")        ;; 12 bytes

  ;; realloc(old-ptr, old-size, align, new-size): a bump allocator that grows
  ;; memory as needed. The canonical ABI only calls it with old-ptr = 0 here.
  (func $cabi_realloc (export "cabi_realloc")
    (param $old i32) (param $old_size i32) (param $align i32) (param $size i32)
    (result i32)
    (local $ptr i32) (local $end i32) (local $have i32)
    ;; ptr = align_up(heap, align)
    (local.set $ptr
      (i32.and
        (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
        (i32.sub (i32.const 0) (local.get $align))))
    (local.set $end (i32.add (local.get $ptr) (local.get $size)))
    (local.set $have (i32.shl (memory.size) (i32.const 16)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.lt_s
              (memory.grow
                (i32.shr_u
                  (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 0xffff))
                  (i32.const 16)))
              (i32.const 0))
          (then unreachable))))
    (if (i32.ne (local.get $old) (i32.const 0))
      (then
        (memory.copy (local.get $ptr) (local.get $old)
          (select (local.get $old_size) (local.get $size)
            (i32.lt_u (local.get $old_size) (local.get $size))))))
    (global.set $heap (local.get $end))
    (local.get $ptr))

  ;; Sets handle's return area to err(string at $msg, $len) and returns it.
  (func $fail (param $msg i32) (param $len i32) (result i32)
    (i32.store8 (i32.const 16) (i32.const 1))
    (i32.store (i32.const 20) (local.get $msg))
    (i32.store (i32.const 24) (local.get $len))
    (i32.const 16))

  ;; Writes [ptr, ptr+len) with check-write/write, blocking on the stream's
  ;; pollable while it has no room. Returns 0, or 1 if the stream failed.
  (func $write_all (param $out i32) (param $ptr i32) (param $len i32) (result i32)
    (local $permit i64) (local $n i32) (local $pollable i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (call $check_write (local.get $out) (i32.const 0))
        (if (i32.load8_u (i32.const 0))
          (then
            (if (i32.eqz (i32.load8_u (i32.const 8)))
              (then (call $drop_error (i32.load (i32.const 12)))))
            (return (i32.const 1))))
        (local.set $permit (i64.load (i32.const 8)))
        (if (i64.eqz (local.get $permit))
          (then
            (local.set $pollable (call $subscribe (local.get $out)))
            (call $block (local.get $pollable))
            (call $drop_pollable (local.get $pollable))
            (br $more)))
        ;; n = min(len, permit)
        (local.set $n
          (if (result i32) (i64.lt_u (local.get $permit) (i64.extend_i32_u (local.get $len)))
            (then (i32.wrap_i64 (local.get $permit)))
            (else (local.get $len))))
        (call $write (local.get $out) (local.get $ptr) (local.get $n) (i32.const 0))
        (if (i32.load8_u (i32.const 0))
          (then
            (if (i32.eqz (i32.load8_u (i32.const 4)))
              (then (call $drop_error (i32.load (i32.const 8)))))
            (return (i32.const 1))))
        (local.set $ptr (i32.add (local.get $ptr) (local.get $n)))
        (local.set $len (i32.sub (local.get $len) (local.get $n)))
        (br $more)))
    (i32.const 0))

  ;; handle(info: connection-info, input, output) -> result<_, string>
  ;; The record is flattened: peer-address (ptr, len), local-address (ptr, len),
  ;; connection-id (i64), worker (ptr, len), tenant (ptr, len); then the two
  ;; stream handles. The result goes through the return area at 16.
  (func (export "handle")
    (param $peer_ptr i32) (param $peer_len i32)
    (param $local_ptr i32) (param $local_len i32)
    (param $id i64)
    (param $worker_ptr i32) (param $worker_len i32)
    (param $tenant_ptr i32) (param $tenant_len i32)
    (param $in i32) (param $out i32)
    (result i32)
    (local $mark i32) (local $failed i32)
    ;; Everything allocated from here on is one chunk at a time.
    (local.set $mark (global.get $heap))
    (block $eof
      (loop $more
        (call $blocking_read (local.get $in) (i64.const 65536) (i32.const 0))
        (if (i32.load8_u (i32.const 0))
          (then
            ;; err: closed ends the input; last-operation-failed is an error
            (br_if $eof (i32.eq (i32.load8_u (i32.const 4)) (i32.const 1)))
            (call $drop_error (i32.load (i32.const 8)))
            (return (call $fail (i32.const 32) (i32.const 11)))))
        (local.set $failed
          (call $write_all (local.get $out) (i32.load (i32.const 4)) (i32.load (i32.const 8))))
        (global.set $heap (local.get $mark))
        (if (local.get $failed)
          (then (return (call $fail (i32.const 48) (i32.const 12)))))
        (br $more)))
    (call $blocking_flush (local.get $out) (i32.const 0))
    (if (i32.load8_u (i32.const 0))
      (then
        (if (i32.eqz (i32.load8_u (i32.const 4)))
          (then (call $drop_error (i32.load (i32.const 8)))))
        (return (call $fail (i32.const 64) (i32.const 12)))))
    (call $drop_input (local.get $in))
    (call $drop_output (local.get $out))
    ;; ok
    (i32.store8 (i32.const 16) (i32.const 0))
    (i32.const 16))
)
