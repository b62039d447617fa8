package mqttconn

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// countingConn counts the writes that reach the connection underneath.
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// A burst written while the peer is slow arrives whole and in order, in
// far fewer writes than packets; a lone packet goes out without waiting for
// company.
func TestCoalescedBurstInOrderLoneAtOnce(t *testing.T) {
	a, b := net.Pipe()
	cc := &countingConn{Conn: a}
	w := coalesce(cc)
	defer w.Close()
	defer b.Close()

	// A lone packet: the peer gets it although nothing follows.
	go w.Write([]byte("lone"))
	got := make([]byte, 4)
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(b, got); err != nil || string(got) != "lone" {
		t.Fatalf("a lone write did not arrive by itself: %q, %v", got, err)
	}

	// A burst against a slow reader (net.Pipe: each write waits for reads).
	const n = 2000
	var want bytes.Buffer
	for i := 0; i < n; i++ {
		fmt.Fprintf(&want, "packet %04d;", i)
	}
	read := make(chan []byte)
	go func() {
		var buf bytes.Buffer
		chunk := make([]byte, 512)
		for buf.Len() < want.Len() {
			time.Sleep(time.Millisecond)
			k, err := b.Read(chunk)
			if err != nil {
				break
			}
			buf.Write(chunk[:k])
		}
		read <- buf.Bytes()
	}()
	before := cc.writes.Load()
	for i := 0; i < n; i++ {
		if _, err := fmt.Fprintf(w, "packet %04d;", i); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case g := <-read:
		if !bytes.Equal(g, want.Bytes()) {
			t.Fatalf("the burst arrived altered: %d bytes, want %d", len(g), want.Len())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the burst did not arrive")
	}
	if k := cc.writes.Load() - before; k > n/10 {
		t.Errorf("%d packets took %d writes underneath; want them gathered (at most %d)", n, k, n/10)
	}
}

// Close writes what paho wrote just before it (its DISCONNECT) first.
func TestCoalescedCloseFlushes(t *testing.T) {
	a, b := net.Pipe()
	w := coalesce(a)
	got := make(chan []byte)
	go func() {
		all, _ := io.ReadAll(b)
		got <- all
	}()
	w.Write([]byte("first;"))
	w.Write([]byte("disconnect"))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case g := <-got:
		if string(g) != "first;disconnect" {
			t.Fatalf("peer read %q before the close", g)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("close did not close")
	}
	if _, err := w.Write([]byte("x")); err == nil {
		t.Fatal("write after close succeeded")
	}
}

// A write that fails underneath fails every later Write and closes the
// connection, so paho's reader sees the connection gone.
func TestCoalescedWriteErrorSticks(t *testing.T) {
	a, b := net.Pipe()
	w := coalesce(a)
	defer w.Close()
	b.Close() // the peer is gone: writes to a fail
	w.Write([]byte("lost"))
	deadline := time.Now().Add(10 * time.Second)
	var err error
	for err == nil && time.Now().Before(deadline) {
		_, err = w.Write([]byte("more"))
		time.Sleep(10 * time.Millisecond)
	}
	if err == nil {
		t.Fatal("writes kept succeeding after the connection failed")
	}
	if _, rerr := a.Read(make([]byte, 1)); !errors.Is(rerr, io.ErrClosedPipe) && !errors.Is(rerr, io.EOF) {
		t.Fatalf("the connection was not closed after the failed write: read %v", rerr)
	}
}

// A stalled peer holds the writer back once coalesceMax is waiting, and
// Close still returns (after closeFlush).
func TestCoalescedStalledPeer(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	w := coalesce(a)
	wrote := make(chan int)
	go func() {
		n := 0
		p := make([]byte, 1024)
		for {
			if _, err := w.Write(p); err != nil {
				break
			}
			n++
		}
		wrote <- n
	}()
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	w.Close()
	n := <-wrote
	if n*1024 > 2*coalesceMax+2048 {
		t.Errorf("%d KiB accepted while nothing was read; want at most about %d KiB", n, 2*coalesceMax>>10)
	}
	if el := time.Since(start); el > closeFlush+5*time.Second {
		t.Errorf("close took %s with a stalled peer", el)
	}
}
