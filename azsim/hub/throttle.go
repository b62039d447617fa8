package hub

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// d2cShaper is the hub-wide device-to-cloud send throttle with traffic
// shaping as Learn's "IoT Hub quotas and throttling" describes it: requests
// above the rate are first processed immediately (a burst), then queued and
// processed at the rate, and once the queue is full refused. It is the
// virtual-scheduling form of a token bucket: tat is the time at which the
// queue will have drained; a send arriving at now is processed at
// max(now, tat-burst) and refused when that is more than maxWait away.
// Processing times are handed out in arrival order and never decrease, so
// one FIFO serves every connection and each keeps its PUBACK order.
type d2cShaper struct {
	interval time.Duration // one send at the rate
	burst    time.Duration // burst sends' worth of intervals
	maxWait  time.Duration // the backlog: the longest a send is held

	mu  sync.Mutex
	tat time.Time
}

func newShaper(rate, burst int, backlog time.Duration) *d2cShaper {
	iv := time.Second / time.Duration(rate)
	return &d2cShaper{interval: iv, burst: time.Duration(burst) * iv, maxWait: backlog}
}

// admit returns how long the send waits before it is processed, or false
// when it would wait longer than the backlog allows (the hub refuses it).
func (s *d2cShaper) admit(now time.Time) (time.Duration, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	tat := s.tat
	if tat.Before(now) {
		tat = now
	}
	wait := max(0, tat.Sub(now)-s.burst)
	if wait > s.maxWait {
		return 0, false
	}
	s.tat = tat.Add(s.interval)
	return wait, true
}

// shaped is a device-to-cloud message held by the shaper.
type shaped struct {
	cl  *mqtt.Client
	pk  packets.Packet
	t   deviceTopic
	due time.Time
}

// d2cQueue holds shaped messages in arrival order (= processing order) and
// counts them per connection, so a message that may go at once still waits
// behind its connection's earlier ones.
type d2cQueue struct {
	mu     sync.Mutex
	items  []shaped
	perCl  map[*mqtt.Client]int
	signal chan struct{}
}

func newD2CQueue() *d2cQueue {
	return &d2cQueue{perCl: map[*mqtt.Client]int{}, signal: make(chan struct{}, 1)}
}

// holding reports whether cl has messages in the queue.
func (q *d2cQueue) holding(cl *mqtt.Client) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.perCl[cl] > 0
}

func (q *d2cQueue) push(s shaped) {
	q.mu.Lock()
	q.items = append(q.items, s)
	q.perCl[s.cl]++
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

// done is called once a message next returned has been processed: only
// then may its connection's later messages bypass the queue.
func (q *d2cQueue) done(cl *mqtt.Client) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.perCl[cl]--; q.perCl[cl] <= 0 {
		delete(q.perCl, cl)
	}
}

// next waits for the queue's head and its processing time; false when ctx
// ends first.
func (q *d2cQueue) next(ctx context.Context) (shaped, bool) {
	for {
		q.mu.Lock()
		if len(q.items) > 0 {
			s := q.items[0]
			q.mu.Unlock()
			t := time.NewTimer(time.Until(s.due))
			select {
			case <-ctx.Done():
				t.Stop()
				return shaped{}, false
			case <-t.C:
			}
			q.mu.Lock()
			q.items = q.items[1:]
			q.mu.Unlock()
			return s, true
		}
		q.mu.Unlock()
		select {
		case <-ctx.Done():
			return shaped{}, false
		case <-q.signal:
		}
	}
}

// runShaped processes held messages when their time comes: a message whose
// connection has ended meanwhile is dropped unacknowledged (it never
// reached the hub; the device sends it again), the others are taken like
// unshaped ones and acknowledged now.
func (h *Hub) runShaped() {
	for {
		s, ok := h.d2cQ.next(h.ctx)
		if !ok {
			return
		}
		if !s.cl.Closed() {
			h.takeTelemetry(s.cl, s.pk, s.t)
			if s.pk.FixedHeader.Qos == 1 {
				_ = s.cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: s.pk.PacketID})
			}
		}
		h.d2cQ.done(s.cl)
	}
}

// admitTelemetry decides what becomes of a device-to-cloud PUBLISH, and
// answers for OnPublish: CodeSuccessIgnore when the message is taken now
// (the broker sends the PUBACK), ErrRejectPacket when it is held by the
// shaper (PUBACK later, from runShaped) or refused. MQTT 3.1.1 has no
// negative PUBACK: the hub refuses by closing the connection without one
// (docs/azure-fidelity.md has the evidence), 403002 once the daily quota is
// used up, 429002 when the shaper's backlog is full.
func (h *Hub) admitTelemetry(cl *mqtt.Client, pk packets.Packet, t deviceTopic) error {
	if h.quota.exhausted() {
		v := h.quota.view()
		h.closeConn(cl, 403002, fmt.Sprintf("IoTHubQuotaExceeded: the daily quota of %d messages is used up until %s", v.Limit, v.ResetsAt.Format(time.RFC3339)))
		return packets.ErrRejectPacket
	}
	if h.shaper == nil {
		h.takeTelemetry(cl, pk, t)
		return packets.CodeSuccessIgnore
	}
	now := time.Now()
	wait, ok := h.shaper.admit(now)
	if !ok {
		h.closeConn(cl, 429002, fmt.Sprintf("ThrottleBacklogLimitExceeded: device-to-cloud sends above %d per second for longer than the %v backlog", h.cfg.D2CRate, h.shaper.maxWait))
		return packets.ErrRejectPacket
	}
	if wait == 0 && !h.d2cQ.holding(cl) {
		h.takeTelemetry(cl, pk, t)
		return packets.CodeSuccessIgnore
	}
	h.d2cQ.push(shaped{cl: cl, pk: pk, t: t, due: now.Add(wait)})
	return packets.ErrRejectPacket
}

// takeTelemetry is a device-to-cloud message reaching the hub: charged to
// the quota and written to the telemetry log.
func (h *Hub) takeTelemetry(cl *mqtt.Client, pk packets.Packet, t deviceTopic) {
	h.quota.charge(messageSize(t.bag, pk.Payload))
	h.recordTelemetry(cl.ID, pk.TopicName, t.bag, pk.Payload, pk.FixedHeader.Retain, false)
}

// messageSize is a message's size as IoT Hub meters it ("Create and read
// IoT Hub messages": the body, the values of the system properties, the
// names and values of the application properties; protocol framing is
// ignored).
func messageSize(bag []property, payload []byte) int {
	n := len(payload)
	for _, p := range bag {
		if !strings.HasPrefix(p.key, "$.") {
			n += len(p.key)
		}
		if p.value != nil {
			n += len(*p.value)
		}
	}
	return n
}

// closeConn ends a device's connection the way the hub refuses an
// operation on MQTT: no answer, the connection closes. The error code and
// reason go where Azure puts them, in the hub's logs (here the device's
// lastDisconnect in the admin API), never to the device.
func (h *Hub) closeConn(cl *mqtt.Client, code int, reason string) {
	h.noteDisconnect(cl.ID, code, reason)
	cl.Stop(fmt.Errorf("%d %s", code, reason))
}

// noteDisconnect records why the hub is about to close a device's
// connection.
func (h *Hub) noteDisconnect(id string, code int, reason string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if d, ok := h.devices[id]; ok {
		d.lastDisconnect = &disconnect{At: h.now().UTC(), ErrorCode: code, Reason: reason}
	}
}
