package mqttconn

import (
	"net"
	"sync"
	"time"
)

// coalesced is the connection paho writes to over raw MQTT. paho writes
// every packet with its own Write from one goroutine, so a drain paid one
// TLS record and one write system call per message: an eighth of the
// agent's CPU per drained message (make bench, issue 22). Here Write only
// copies the packet into a buffer, and one flusher goroutine writes what
// gathered while its previous write was under way: a lone packet goes out
// at once, as before, and a burst goes out in a few large writes.
//
// What paho believes written may still be in the buffer when the
// connection dies; the agent keeps every message until its PUBACK, so
// nothing is lost. Close writes what is buffered first (paho's DISCONNECT
// comes just before it), giving up after closeFlush.
type coalesced struct {
	net.Conn
	mu      sync.Mutex
	room    sync.Cond // signalled when the flusher took the buffer
	buf     []byte    // written by paho, not yet handed to the flusher
	spare   []byte    // the flusher's last batch, reused
	busy    bool      // the flusher has a batch or is about to take buf
	err     error     // the first failed write; every later Write fails with it
	closed  bool
	kick    chan struct{}
	flushed chan struct{} // closed when the flusher ends
}

const (
	// coalesceMax bounds the buffer: a Write waits while this much is
	// waiting for the flusher, so a stalled connection holds paho back as
	// a plain one would.
	coalesceMax = 64 << 10
	// closeFlush is how long Close waits for the buffer to go out.
	closeFlush = 2 * time.Second
	// idleBuffer is the most buffer kept once a burst is written.
	idleBuffer = 4 << 10
)

func coalesce(c net.Conn) *coalesced {
	w := &coalesced{Conn: c, kick: make(chan struct{}, 1), flushed: make(chan struct{})}
	w.room.L = &w.mu
	go w.flusher()
	return w
}

func (w *coalesced) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.err == nil && !w.closed && len(w.buf) > 0 && len(w.buf)+len(p) > coalesceMax {
		w.room.Wait()
	}
	if w.err != nil {
		return 0, w.err
	}
	if w.closed {
		return 0, net.ErrClosed
	}
	w.buf = append(w.buf, p...)
	if !w.busy {
		w.busy = true
		w.kick <- struct{}{}
	}
	return len(p), nil
}

// flusher writes the buffer whenever there is something in it, until the
// connection is closed or a write fails.
func (w *coalesced) flusher() {
	defer close(w.flushed)
	for range w.kick {
		w.mu.Lock()
		for len(w.buf) > 0 && w.err == nil {
			batch := w.buf
			w.buf = w.spare[:0]
			w.room.Broadcast()
			w.mu.Unlock()
			_, err := w.Conn.Write(batch)
			w.mu.Lock()
			w.spare = batch
			if err != nil {
				w.err = err
				w.room.Broadcast()
			}
		}
		w.busy = false
		done := w.closed || w.err != nil
		if cap(w.spare) > idleBuffer {
			w.spare = nil // a burst's buffers are not kept while idle
		}
		if cap(w.buf) > idleBuffer {
			w.buf = nil
		}
		w.mu.Unlock()
		if done {
			if w.err != nil {
				w.Conn.Close() // paho's reader notices, as after any failed write
			}
			return
		}
	}
}

// Close writes what is buffered (for up to closeFlush), then closes.
func (w *coalesced) Close() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return w.Conn.Close()
	}
	w.closed = true
	w.room.Broadcast()
	if !w.busy {
		w.busy = true
		w.kick <- struct{}{}
	}
	w.mu.Unlock()
	w.Conn.SetWriteDeadline(time.Now().Add(closeFlush))
	<-w.flushed
	return w.Conn.Close()
}
