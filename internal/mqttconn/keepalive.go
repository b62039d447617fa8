package mqttconn

import (
	"encoding/binary"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gwagent/gwagent/internal/clock"
)

// keeper is the connection paho writes to and reads from, and it keeps the
// MQTT keep-alive in paho's place. paho's own pinger wakes every 5 s to
// compare clocks, whatever the keep-alive (240 s by default): 12 of an
// idle agent's 19 timer wakeups a minute (make bench's idle row, issue
// 22). paho also stores a time.Time in an atomic.Value for every packet
// sent and received while its pinger is on: two allocations per drained
// message. Configure turns paho's pinger off, and keeper does the same
// work from what it sees pass:
//
//   - The CONNECT that paho writes says keep-alive 0 (paho's way of saying
//     "no pinger"); keeper writes the configured value into it, so the
//     server holds the session to it as before.
//   - Every quarter of the keep-alive it looks whether anything was
//     written or read since its last look. Once nothing was written, or
//     nothing read, for most of the keep-alive, it writes a PINGREQ, as
//     paho did when nothing had passed for the whole keep-alive: the server
//     hears from the device within the keep-alive, as MQTT requires.
//   - A PINGREQ sets a read deadline of the ping timeout on the connection,
//     which the next byte read clears. When nothing arrives in time, paho's
//     reader fails on the deadline and the connection is lost, as after
//     paho's "pingresp not received".
//
// paho writes each packet with one Write, so the PINGREQ never lands inside
// another packet.
type keeper struct {
	net.Conn
	clk   clock.Clock
	every time.Duration // the keep-alive
	wait  time.Duration // how long a PINGREQ waits for anything to come back

	mu        sync.Mutex // one writer at a time: paho's, or the PINGREQ
	connected bool       // the CONNECT went out and the checks run

	wrote, read atomic.Bool // since the last check

	dl      sync.Mutex  // pinging and the read deadline change together
	pinging atomic.Bool // a read deadline waits for an answer

	stop     chan struct{}
	stopOnce sync.Once
}

func keepAlive(c net.Conn, clk clock.Clock, every, wait time.Duration) *keeper {
	return &keeper{Conn: c, clk: clock.Or(clk), every: every, wait: wait, stop: make(chan struct{})}
}

func (k *keeper) Write(p []byte) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.connected {
		q, err := withKeepAlive(p, k.every)
		if err != nil {
			return 0, err
		}
		n, err := k.Conn.Write(q)
		if err != nil {
			return n, err
		}
		k.connected = true
		go k.run()
		return n, nil
	}
	k.wrote.Store(true)
	return k.Conn.Write(p)
}

func (k *keeper) Read(p []byte) (int, error) {
	n, err := k.Conn.Read(p)
	if n > 0 {
		k.read.Store(true)
		if k.pinging.Load() {
			k.dl.Lock()
			if k.pinging.Load() {
				k.pinging.Store(false)
				k.Conn.SetReadDeadline(time.Time{})
			}
			k.dl.Unlock()
		}
	}
	return n, err
}

func (k *keeper) Close() error {
	k.stopOnce.Do(func() { close(k.stop) })
	return k.Conn.Close()
}

// pingreq is MQTT's PINGREQ packet.
var pingreq = []byte{0xc0, 0}

// run makes the checks until the connection closes.
func (k *keeper) run() {
	look := k.every / 4
	t, tick := k.clk.NewTimer(look)
	defer t.Stop()
	var quietOut, quietIn time.Duration // to within one look
	for {
		select {
		case <-k.stop:
			return
		case <-tick:
		}
		if k.wrote.Swap(false) {
			quietOut = 0
		} else {
			quietOut += look
		}
		if k.read.Swap(false) {
			quietIn = 0
		} else {
			quietIn += look
		}
		if quietOut+look >= k.every || quietIn+look >= k.every {
			if k.ping() != nil {
				return // paho's writer fails on the same connection
			}
			quietOut, quietIn = 0, 0
		}
		t.Reset(look)
	}
}

// ping writes a PINGREQ with a read deadline for the answer.
func (k *keeper) ping() error {
	k.dl.Lock()
	if !k.pinging.Load() {
		k.pinging.Store(true)
		k.Conn.SetReadDeadline(time.Now().Add(k.wait))
	}
	k.dl.Unlock()
	k.mu.Lock()
	defer k.mu.Unlock()
	_, err := k.Conn.Write(pingreq)
	return err
}

var errNotConnect = errors.New("mqttconn: the first packet written is not an MQTT CONNECT")

// withKeepAlive returns a copy of the CONNECT packet p with its keep-alive
// set to every (in whole seconds, at most 65535).
func withKeepAlive(p []byte, every time.Duration) ([]byte, error) {
	if len(p) < 2 || p[0] != 0x10 {
		return nil, errNotConnect
	}
	i := 1 // the remaining length: 1 to 4 bytes, the last without 0x80
	for i < len(p) && i < 4 && p[i]&0x80 != 0 {
		i++
	}
	if i >= len(p) || p[i]&0x80 != 0 {
		return nil, errNotConnect
	}
	i++
	if i+2 > len(p) {
		return nil, errNotConnect
	}
	// The protocol name (a length and the bytes), the level, the flags.
	at := i + 2 + int(binary.BigEndian.Uint16(p[i:])) + 2
	if at+2 > len(p) {
		return nil, errNotConnect
	}
	q := append([]byte(nil), p...)
	binary.BigEndian.PutUint16(q[at:], uint16(min(every/time.Second, 65535)))
	return q, nil
}
