// The echo handler in Go: writes back exactly the bytes it reads, until the
// input ends, then flushes and returns. Built for GOOS=wasip1 as a reactor
// (-buildmode=c-shared) and made a component by build.sh; abi.go is the
// hand-written canonical-ABI glue.

package main

import "unsafe"

// readChunk is the most the handler asks for in one read.
const readChunk = 64 * 1024

// The messages `handle` can return as err; string constants live in
// read-only data, so their addresses stay valid after the call.
const (
	msgRead  = "read failed"
	msgWrite = "write failed"
	msgFlush = "flush failed"
)

func main() {}

// handle(info: connection-info, input, output) -> result<_, string>.
// The record comes flattened: peer-address (ptr, len), local-address
// (ptr, len), connection-id, worker (ptr, len), tenant (ptr, len).
//
//go:wasmexport handle
func handle(peerPtr, peerLen, localPtr, localLen uint32, connectionID uint64,
	workerPtr, workerLen, tenantPtr, tenantLen uint32, input, output uint32) uint32 {
	// The info strings sit in the arena from here on; each chunk is
	// allocated after them and released once written.
	mark := arenaUsed
	for {
		inputBlockingRead(input, readChunk, retPtr())
		if retU8(0) != 0 {
			if retU8(4) == 1 { // closed: the input ended
				break
			}
			dropError(retU32(8))
			return fail(msgRead)
		}
		ok := writeAll(output, retU32(4), retU32(8))
		arenaUsed = mark
		if !ok {
			return fail(msgWrite)
		}
	}
	outputBlockingFlush(output, retPtr())
	if retU8(0) != 0 {
		if retU8(4) == 0 {
			dropError(retU32(8))
		}
		return fail(msgFlush)
	}
	dropInputStream(input)
	dropOutputStream(output)
	handleRet[0] = 0
	return uint32(uintptr(unsafe.Pointer(&handleRet)))
}

// writeAll writes [ptr, ptr+n) with check-write/write, waiting on the
// stream's pollable while it has no room (blocking-write-and-flush would
// take at most 4,096 bytes a call).
func writeAll(output, ptr, n uint32) bool {
	for n > 0 {
		outputCheckWrite(output, retPtr())
		if retU8(0) != 0 {
			if retU8(8) == 0 {
				dropError(retU32(12))
			}
			return false
		}
		permit := retArea[1]
		if permit == 0 {
			p := outputSubscribe(output)
			pollableBlock(p)
			dropPollable(p)
			continue
		}
		m := n
		if permit < uint64(m) {
			m = uint32(permit)
		}
		outputWrite(output, ptr, m, retPtr())
		if retU8(0) != 0 {
			if retU8(4) == 0 {
				dropError(retU32(8))
			}
			return false
		}
		ptr += m
		n -= m
	}
	return true
}

// fail sets handle's result to err(msg) and returns its address.
func fail(msg string) uint32 {
	handleRet[0] = 1
	handleRet[1] = uint32(uintptr(unsafe.Pointer(unsafe.StringData(msg))))
	handleRet[2] = uint32(len(msg))
	return uint32(uintptr(unsafe.Pointer(&handleRet)))
}
