// The canonical-ABI glue for the `host:handler/handler` world, written by hand:
// the `wasi:io` imports this handler uses, a `cabi_realloc` that never touches
// the Go heap, and the layouts of the results the imports write to memory.

package main

import "unsafe"

// --- imports (core signatures of the canonical ABI) ---

// blocking-read(self, len, retptr): result<list<u8>, stream-error> at retptr.
//
//go:wasmimport wasi:io/streams@0.2.12 [method]input-stream.blocking-read
func inputBlockingRead(self uint32, len uint64, ret uint32)

// check-write(self, retptr): result<u64, stream-error> at retptr.
//
//go:wasmimport wasi:io/streams@0.2.12 [method]output-stream.check-write
func outputCheckWrite(self uint32, ret uint32)

// write(self, ptr, len, retptr): result<_, stream-error> at retptr.
//
//go:wasmimport wasi:io/streams@0.2.12 [method]output-stream.write
func outputWrite(self uint32, ptr uint32, len uint32, ret uint32)

// blocking-flush(self, retptr): result<_, stream-error> at retptr.
//
//go:wasmimport wasi:io/streams@0.2.12 [method]output-stream.blocking-flush
func outputBlockingFlush(self uint32, ret uint32)

// subscribe(self) -> own<pollable>.
//
//go:wasmimport wasi:io/streams@0.2.12 [method]output-stream.subscribe
func outputSubscribe(self uint32) uint32

//go:wasmimport wasi:io/streams@0.2.12 [resource-drop]input-stream
func dropInputStream(self uint32)

//go:wasmimport wasi:io/streams@0.2.12 [resource-drop]output-stream
func dropOutputStream(self uint32)

//go:wasmimport wasi:io/poll@0.2.12 [method]pollable.block
func pollableBlock(self uint32)

//go:wasmimport wasi:io/poll@0.2.12 [resource-drop]pollable
func dropPollable(self uint32)

//go:wasmimport wasi:io/error@0.2.12 [resource-drop]error
func dropError(self uint32)

// --- memory the host writes into ---

// retArea receives the results of the imports above. Its layouts:
//
//	result<list<u8>, stream-error>: u8 tag @0; ok: ptr u32 @4, len u32 @8;
//	                                err: u8 stream-error tag @4, handle u32 @8
//	result<u64, stream-error>:      u8 tag @0; ok: u64 @8;
//	                                err: u8 stream-error tag @8, handle u32 @12
//	result<_, stream-error>:        u8 tag @0; err: u8 stream-error tag @4, handle u32 @8
//
// stream-error's tag is 0 for last-operation-failed(error) and 1 for closed.
var retArea [2]uint64

func retPtr() uint32 { return uint32(uintptr(unsafe.Pointer(&retArea))) }

func retU8(off uintptr) uint8 {
	return *(*uint8)(unsafe.Add(unsafe.Pointer(&retArea), off))
}

func retU32(off uintptr) uint32 {
	return *(*uint32)(unsafe.Add(unsafe.Pointer(&retArea), off))
}

// handleRet is `handle`'s return area: result<_, string>, u8 tag @0,
// string ptr @4 and len @8.
var handleRet [3]uint32

// arenaSize bounds what the host may hand over at once: the connection-info
// strings plus one chunk of at most readChunk bytes.
const arenaSize = 4*readChunk + 64*1024

// arena backs cabi_realloc. It is a global, not a Go allocation: the host
// calls cabi_realloc from inside an import call (to place the bytes that
// blocking-read returns), and a Go heap allocation there can run the garbage
// collector or the scheduler, which call WASI (clock_time_get, ...); the
// canonical ABI forbids calling imports from inside realloc, so the call
// traps with "cannot leave component instance" (seen from ~200 KiB of input
// on when cabi_realloc used make()).
var arena [arenaSize]byte

// arenaUsed is the bump pointer into arena, as an offset.
var arenaUsed uintptr

//go:wasmexport cabi_realloc
func cabiRealloc(oldPtr, oldSize, align, newSize uint32) uint32 {
	base := uintptr(unsafe.Pointer(&arena[0]))
	a := uintptr(align)
	if a == 0 {
		a = 1
	}
	p := (base + arenaUsed + a - 1) &^ (a - 1)
	end := p + uintptr(newSize)
	if end > base+arenaSize {
		// No way to report this from inside the host's call: trap.
		trap()
	}
	if oldPtr != 0 && oldSize != 0 {
		n := oldSize
		if newSize < n {
			n = newSize
		}
		// Never used by the canonical ABI's lowering; kept for completeness.
		from, to := uintptr(oldPtr)-base, p-base
		copy(arena[to:to+uintptr(n)], arena[from:from+uintptr(n)])
	}
	arenaUsed = end - base
	return uint32(p)
}

// trap ends the call: a nil dereference panics, and a panic inside
// cabi_realloc ends in a wasm trap (printing it calls WASI, which the
// canonical ABI forbids there).
func trap() {
	var zero *uint32
	*zero = 1
}
