;; A small WASI preview 1 -> WASI 0.2 adapter for Go's wasip1 runtime, in
;; place of wasmtime's general adapter.
;;
;; Why: wasmtime's adapter keeps its state in a page of the shared linear
;; memory. Given Go's cabi_realloc it would call Go before the Go runtime is
;; initialised; with --realloc-via-memory-grow it takes a page with
;; memory.grow, but Go's allocator (runtime/mem_wasm.go) assumes it alone grows
;; memory and later hands that page out as Go heap: after about 1 MiB of Go
;; allocations the adapter's state is overwritten and it traps
;; ("assertion failed at adapter line ..."). This adapter keeps no state at
;; all; the only memory it writes besides the caller's buffers is a 16-byte
;; scratch area at address 8192, which lies in the range [4096, 12288) that
;; Go's linker reserves below its data (for wasm_exec.js; never used under
;; wasip1). build.sh checks that the Go module's data still starts above it.
;;
;; It implements the functions Go's wasip1 runtime imports:
;;   sched_yield proc_exit args_get args_sizes_get environ_get
;;   environ_sizes_get clock_time_get fd_write random_get poll_oneoff
;; and those that packages such as time, os and fmt add:
;;   fd_fdstat_get fd_fdstat_set_flags fd_prestat_get fd_prestat_dir_name
;;   fd_read fd_close fd_filestat_get fd_seek path_open path_filestat_get
;; The program gets no arguments, environment variables or preopened
;; directories (the host grants none); stdin reads as empty; fd_write reaches
;; stdout and stderr. A Go program importing any other WASI preview 1
;; function fails at `wasm-tools component new` with "adapter module did not
;; export `NAME`": add NAME here.
(module
  (import "env" "memory" (memory 0))

  (import "wasi:clocks/monotonic-clock@0.2.12" "now" (func $mono_now (result i64)))
  (import "wasi:clocks/monotonic-clock@0.2.12" "subscribe-duration"
    (func $subscribe_duration (param i64) (result i32)))
  ;; now(retptr): datetime { seconds: u64 @0, nanoseconds: u32 @8 }
  (import "wasi:clocks/wall-clock@0.2.12" "now" (func $wall_now (param i32)))
  (import "wasi:random/random@0.2.12" "get-random-u64" (func $random_u64 (result i64)))
  ;; exit(status: result): 0 ok, 1 err
  (import "wasi:cli/exit@0.2.12" "exit" (func $exit (param i32)))
  (import "wasi:cli/stdout@0.2.12" "get-stdout" (func $get_stdout (result i32)))
  (import "wasi:cli/stderr@0.2.12" "get-stderr" (func $get_stderr (result i32)))
  ;; blocking-write-and-flush(self, ptr, len, retptr): result<_, stream-error>
  (import "wasi:io/streams@0.2.12" "[method]output-stream.blocking-write-and-flush"
    (func $write_and_flush (param i32 i32 i32 i32)))
  (import "wasi:io/streams@0.2.12" "[resource-drop]output-stream"
    (func $drop_output (param i32)))
  (import "wasi:io/poll@0.2.12" "[method]pollable.block" (func $block (param i32)))
  (import "wasi:io/poll@0.2.12" "[resource-drop]pollable" (func $drop_pollable (param i32)))

  (global $scratch i32 (i32.const 8192))

  ;; errno values of WASI preview 1
  (global $EBADF i32 (i32.const 8))
  (global $ESPIPE i32 (i32.const 70))
  (global $EINVAL i32 (i32.const 28))
  (global $EIO i32 (i32.const 29))

  (func (export "sched_yield") (result i32)
    (i32.const 0))

  (func (export "proc_exit") (param $code i32)
    (call $exit (i32.ne (local.get $code) (i32.const 0)))
    unreachable)

  (func (export "args_sizes_get") (param $argc i32) (param $size i32) (result i32)
    (i32.store (local.get $argc) (i32.const 0))
    (i32.store (local.get $size) (i32.const 0))
    (i32.const 0))

  (func (export "args_get") (param i32 i32) (result i32)
    (i32.const 0))

  (func (export "environ_sizes_get") (param $count i32) (param $size i32) (result i32)
    (i32.store (local.get $count) (i32.const 0))
    (i32.store (local.get $size) (i32.const 0))
    (i32.const 0))

  (func (export "environ_get") (param i32 i32) (result i32)
    (i32.const 0))

  ;; fd_fdstat_get(fd, out): stdin, stdout and stderr are character devices.
  ;;   fdstat (24 bytes): filetype u8 @0, flags u16 @2, rights u64 @8 and @16
  (func (export "fd_fdstat_get") (param $fd i32) (param $out i32) (result i32)
    (if (i32.gt_u (local.get $fd) (i32.const 2)) (then (return (global.get $EBADF))))
    (i32.store8 (local.get $out) (i32.const 2))
    (i32.store16 offset=2 (local.get $out) (i32.const 0))
    (i64.store offset=8 (local.get $out) (i64.const -1))
    (i64.store offset=16 (local.get $out) (i64.const -1))
    (i32.const 0))

  ;; fd_fdstat_set_flags(fd, flags): accepted and ignored for stdio.
  (func (export "fd_fdstat_set_flags") (param $fd i32) (param i32) (result i32)
    (if (result i32) (i32.gt_u (local.get $fd) (i32.const 2))
      (then (global.get $EBADF))
      (else (i32.const 0))))

  ;; No preopened directories: Go stops scanning at the first EBADF.
  (func (export "fd_prestat_get") (param i32 i32) (result i32)
    (global.get $EBADF))

  (func (export "fd_prestat_dir_name") (param i32 i32 i32) (result i32)
    (global.get $EBADF))

  ;; fd_read(fd, iovs, iovs_len, nread): stdin is empty (end of file).
  (func (export "fd_read") (param $fd i32) (param i32 i32) (param $nread i32) (result i32)
    (if (local.get $fd) (then (return (global.get $EBADF))))
    (i32.store (local.get $nread) (i32.const 0))
    (i32.const 0))

  (func (export "fd_close") (param $fd i32) (result i32)
    (if (result i32) (i32.gt_u (local.get $fd) (i32.const 2))
      (then (global.get $EBADF))
      (else (i32.const 0))))

  ;; fd_filestat_get(fd, out): stdio are character devices, all else EBADF.
  ;;   filestat (64 bytes): dev @0, ino @8, filetype u8 @16, nlink @24,
  ;;   size @32, atim @40, mtim @48, ctim @56
  (func (export "fd_filestat_get") (param $fd i32) (param $out i32) (result i32)
    (if (i32.gt_u (local.get $fd) (i32.const 2)) (then (return (global.get $EBADF))))
    (memory.fill (local.get $out) (i32.const 0) (i32.const 64))
    (i32.store8 offset=16 (local.get $out) (i32.const 2))
    (i32.const 0))

  ;; fd_seek(fd, offset, whence, newoffset): stdio cannot seek.
  (func (export "fd_seek") (param $fd i32) (param i64 i32 i32) (result i32)
    (if (result i32) (i32.gt_u (local.get $fd) (i32.const 2))
      (then (global.get $EBADF))
      (else (global.get $ESPIPE))))

  ;; No directories: opening or looking up a path fails with EBADF.
  (func (export "path_open") (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)
    (global.get $EBADF))

  (func (export "path_filestat_get") (param i32 i32 i32 i32 i32) (result i32)
    (global.get $EBADF))

  ;; clock_time_get(id, precision, out): realtime (0) and monotonic (1)
  (func (export "clock_time_get") (param $id i32) (param $precision i64) (param $out i32) (result i32)
    (if (i32.eq (local.get $id) (i32.const 1))
      (then
        (i64.store (local.get $out) (call $mono_now))
        (return (i32.const 0))))
    (if (i32.eqz (local.get $id))
      (then
        (call $wall_now (global.get $scratch))
        (i64.store (local.get $out)
          (i64.add
            (i64.mul (i64.load (global.get $scratch)) (i64.const 1000000000))
            (i64.extend_i32_u (i32.load offset=8 (global.get $scratch)))))
        (return (i32.const 0))))
    (global.get $EINVAL))

  ;; random_get(buf, len): fills the buffer 8 bytes at a time.
  (func (export "random_get") (param $buf i32) (param $len i32) (result i32)
    (local $r i64)
    (block $done
      (loop $more
        (br_if $done (i32.lt_u (local.get $len) (i32.const 8)))
        (i64.store (local.get $buf) (call $random_u64))
        (local.set $buf (i32.add (local.get $buf) (i32.const 8)))
        (local.set $len (i32.sub (local.get $len) (i32.const 8)))
        (br $more)))
    (local.set $r (call $random_u64))
    (block $tail_done
      (loop $tail
        (br_if $tail_done (i32.eqz (local.get $len)))
        (i64.store8 (local.get $buf) (local.get $r))
        (local.set $r (i64.shr_u (local.get $r) (i64.const 8)))
        (local.set $buf (i32.add (local.get $buf) (i32.const 1)))
        (local.set $len (i32.sub (local.get $len) (i32.const 1)))
        (br $tail)))
    (i32.const 0))

  ;; fd_write(fd, iovs, iovs_len, nwritten): stdout (1) and stderr (2) only,
  ;; in chunks of at most 4,096 bytes (blocking-write-and-flush's limit).
  (func (export "fd_write")
    (param $fd i32) (param $iovs i32) (param $iovs_len i32) (param $nwritten i32) (result i32)
    (local $stream i32) (local $ptr i32) (local $len i32) (local $n i32)
    (local $total i32) (local $errno i32)
    (if (i32.eq (local.get $fd) (i32.const 1))
      (then (local.set $stream (call $get_stdout)))
      (else
        (if (i32.eq (local.get $fd) (i32.const 2))
          (then (local.set $stream (call $get_stderr)))
          (else (return (global.get $EBADF))))))
    (block $done
      (loop $next_iov
        (br_if $done (i32.eqz (local.get $iovs_len)))
        (local.set $ptr (i32.load (local.get $iovs)))
        (local.set $len (i32.load offset=4 (local.get $iovs)))
        (block $iov_done
          (loop $chunk
            (br_if $iov_done (i32.eqz (local.get $len)))
            (local.set $n
              (select (i32.const 4096) (local.get $len)
                (i32.gt_u (local.get $len) (i32.const 4096))))
            (call $write_and_flush (local.get $stream) (local.get $ptr) (local.get $n)
              (global.get $scratch))
            (if (i32.load8_u (global.get $scratch))
              (then
                ;; The error resource (last-operation-failed) is left to the
                ;; instance's end; the stream reports closed from now on.
                (local.set $errno (global.get $EIO))
                (br $done)))
            (local.set $ptr (i32.add (local.get $ptr) (local.get $n)))
            (local.set $len (i32.sub (local.get $len) (local.get $n)))
            (local.set $total (i32.add (local.get $total) (local.get $n)))
            (br $chunk)))
        (local.set $iovs (i32.add (local.get $iovs) (i32.const 8)))
        (local.set $iovs_len (i32.sub (local.get $iovs_len) (i32.const 1)))
        (br $next_iov)))
    (call $drop_output (local.get $stream))
    (i32.store (local.get $nwritten) (local.get $total))
    (local.get $errno))

  ;; poll_oneoff(in, out, nsubscriptions, nevents). Go calls it to sleep
  ;; (one relative monotonic clock subscription) and to poll descriptors,
  ;; which this adapter does not have. Clock subscriptions: waits for the
  ;; earliest and reports every one due then. Any descriptor subscription is
  ;; reported at once with EBADF and nothing waits.
  ;;   subscription (48 bytes): userdata u64 @0, tag u8 @8 (0 clock),
  ;;     clock: id u32 @16, timeout u64 @24, precision u64 @32, flags u16 @40
  ;;   event (32 bytes): userdata u64 @0, error u16 @8, type u8 @10
  (func (export "poll_oneoff")
    (param $in i32) (param $out i32) (param $nsubs i32) (param $nevents i32) (result i32)
    (local $i i32) (local $sub i32) (local $ev i32) (local $count i32)
    (local $fds i32) (local $wait i64) (local $d i64) (local $p i32)
    (if (i32.eqz (local.get $nsubs)) (then (return (global.get $EINVAL))))
    ;; Pass 1: count descriptor subscriptions, find the shortest wait.
    (local.set $wait (i64.const -1))
    (local.set $i (i32.const 0))
    (block $end1
      (loop $each1
        (br_if $end1 (i32.ge_u (local.get $i) (local.get $nsubs)))
        (local.set $sub (i32.add (local.get $in) (i32.mul (local.get $i) (i32.const 48))))
        (if (i32.load8_u offset=8 (local.get $sub))
          (then (local.set $fds (i32.add (local.get $fds) (i32.const 1))))
          (else
            (local.set $d (call $clock_wait (local.get $sub)))
            (if (i64.lt_u (local.get $d) (local.get $wait))
              (then (local.set $wait (local.get $d))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $each1)))
    (if (i32.eqz (local.get $fds))
      (then
        (local.set $p (call $subscribe_duration (local.get $wait)))
        (call $block (local.get $p))
        (call $drop_pollable (local.get $p))))
    ;; Pass 2: the events.
    (local.set $i (i32.const 0))
    (block $end2
      (loop $each2
        (br_if $end2 (i32.ge_u (local.get $i) (local.get $nsubs)))
        (local.set $sub (i32.add (local.get $in) (i32.mul (local.get $i) (i32.const 48))))
        (local.set $ev (i32.add (local.get $out) (i32.mul (local.get $count) (i32.const 32))))
        (if (i32.load8_u offset=8 (local.get $sub))
          (then
            (i64.store (local.get $ev) (i64.load (local.get $sub)))
            (i32.store16 offset=8 (local.get $ev) (global.get $EBADF))
            (i32.store8 offset=10 (local.get $ev) (i32.load8_u offset=8 (local.get $sub)))
            (local.set $count (i32.add (local.get $count) (i32.const 1))))
          (else
            (if (i32.and (i32.eqz (local.get $fds))
                         (i64.le_u (call $clock_wait (local.get $sub)) (local.get $wait)))
              (then
                (i64.store (local.get $ev) (i64.load (local.get $sub)))
                (i32.store16 offset=8 (local.get $ev) (i32.const 0))
                (i32.store8 offset=10 (local.get $ev) (i32.const 0))
                (local.set $count (i32.add (local.get $count) (i32.const 1)))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $each2)))
    (i32.store (local.get $nevents) (local.get $count))
    (i32.const 0))

  ;; The nanoseconds a clock subscription waits from now: its timeout, or,
  ;; with the abstime flag (1), its timeout minus the clock's current time.
  (func $clock_wait (param $sub i32) (result i64)
    (local $timeout i64) (local $now i64)
    (local.set $timeout (i64.load offset=24 (local.get $sub)))
    (if (i32.eqz (i32.and (i32.load16_u offset=40 (local.get $sub)) (i32.const 1)))
      (then (return (local.get $timeout))))
    (if (i32.eqz (i32.load offset=16 (local.get $sub)))
      (then
        (call $wall_now (global.get $scratch))
        (local.set $now
          (i64.add
            (i64.mul (i64.load (global.get $scratch)) (i64.const 1000000000))
            (i64.extend_i32_u (i32.load offset=8 (global.get $scratch))))))
      (else (local.set $now (call $mono_now))))
    (if (result i64) (i64.gt_u (local.get $timeout) (local.get $now))
      (then (i64.sub (local.get $timeout) (local.get $now)))
      (else (i64.const 0))))
)
