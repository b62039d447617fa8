package telemetry

import (
	"context"
	"sync/atomic"

	"github.com/gwagent/gwagent/telemetry/outbox"
)

// The drain keeps up to drainWindow publishes (and drainBytes of bodies)
// waiting for their PUBACK: a sliding window, so a new message goes out as
// soon as the oldest is acknowledged and the drain runs at the broker's
// pace instead of in bursts.
const (
	drainWindow = 256
	drainBytes  = 1 << 20
	// ackBatch is the most PUBACKs recorded with one outbox write; it is
	// also the most messages read from the outbox at once, and a full read
	// means a backlog.
	ackBatch = 64
)

// inflight is one publish waiting for its PUBACK.
type inflight struct {
	m    *outbox.Message
	wait func(context.Context) error
}

// drain is one session's drain. The sender (Drain's goroutine) reads the
// outbox and publishes ahead; the acker takes the PUBACKs in order and
// records them; the retirer takes delivered spool files out of the spool.
// Each stage hands the next its work over a bounded channel, so after a
// crash at most the window (plus two batches of spool files) is sent again.
type drain struct {
	p   *Pipeline
	pub Publisher
	// q holds what is in flight, besides the batch the acker is taking.
	q       chan inflight
	room    chan struct{} // the acker freed bytes of the window
	pending atomic.Int64  // body bytes in flight
	retireQ chan []string // delivered spool files, acker → retirer
	sys     map[string]string
	backlog bool
}

// Drain sends the outbox's messages over pub in order, oldest first, and
// what is queued later as it comes, until ctx ends or a PUBACK fails (the
// connection is gone: what was not acknowledged is sent again by the next
// Drain). Each message is acked in the outbox after its PUBACK. One Drain
// at a time.
func (p *Pipeline) Drain(ctx context.Context, pub Publisher) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	d := &drain{p: p, pub: pub, q: make(chan inflight, drainWindow-ackBatch), room: make(chan struct{}, 1),
		retireQ: make(chan []string, 2), sys: make(map[string]string, 4)}
	acker, retired := make(chan struct{}), make(chan struct{})
	// Delivered spool files leave the spool on a goroutine of their own,
	// beside the acker: file-system work must not hold back the PUBACKs.
	go func() {
		defer close(retired)
		for paths := range d.retireQ {
			for _, f := range paths {
				p.spoolSent(f)
			}
		}
	}()
	go func() {
		defer close(acker)
		defer close(d.retireQ)
		defer cancel() // a failed PUBACK ends the sender too
		d.ack(ctx)
	}()
	defer func() { close(d.q); <-acker; <-retired }()
	defer d.setBacklog(false)
	d.send(ctx)
}

// send reads the outbox in order and publishes, waiting whenever the outbox
// is empty, until ctx ends.
func (d *drain) send(ctx context.Context) {
	var last uint64
	for ctx.Err() == nil {
		msgs, err := d.p.outbox.Next(last, ackBatch)
		if err != nil {
			d.p.log.Error("outbox read", "err", err)
			return
		}
		if len(msgs) == ackBatch {
			d.setBacklog(true)
		}
		if len(msgs) == 0 {
			d.setBacklog(false)
			d.p.o.Changed(false)
			select {
			case <-ctx.Done():
			case <-d.p.kick:
			}
			continue
		}
		for _, m := range msgs {
			if !d.publish(ctx, m) {
				return
			}
			last = m.Seq
		}
	}
}

// publish is where a message leaves the pipeline: it waits for room in the
// window, starts the publish and hands it to the acker. What paces the
// drain to the hub's rate, or packs several small messages into one
// publish, belongs here. It returns false once ctx has ended.
func (d *drain) publish(ctx context.Context, m *outbox.Message) bool {
	for n := int64(len(m.Body)); d.pending.Load() > 0 && d.pending.Load()+n > drainBytes; {
		select {
		case <-d.room:
		case <-ctx.Done():
			return false
		}
	}
	clear(d.sys)
	for k, v := range m.System {
		d.sys[k] = v
	}
	d.sys["mid"] = m.ID
	d.pending.Add(int64(len(m.Body)))
	f := inflight{m, d.pub.PublishTelemetry(m.Body, d.sys, m.App)}
	select {
	case d.q <- f:
		return true
	case <-ctx.Done():
		return false
	}
}

// ack waits for the PUBACKs in order and records them a batch at a time,
// until q is closed or a PUBACK fails.
func (d *drain) ack(ctx context.Context) {
	polled, stopPoll := context.WithCancel(ctx)
	stopPoll() // a done context: wait only reports a PUBACK already in
	batch := make([]inflight, 0, ackBatch)
	var held *inflight
	for {
		f, ok := inflight{}, true
		if held != nil {
			f, held = *held, nil
		} else if f, ok = <-d.q; !ok {
			return
		}
		if err := f.wait(ctx); err != nil {
			return // sent again from the outbox on the next connection
		}
		// Take the PUBACKs already in with it: one ack write for the lot.
		batch = append(batch[:0], f)
	more:
		for len(batch) < cap(batch) {
			select {
			case g, ok := <-d.q:
				if !ok {
					break more
				}
				if g.wait(polled) != nil {
					held = &g
					break more
				}
				batch = append(batch, g)
			default:
				break more
			}
		}
		d.p.delivered(batch, d.retireQ)
		var n int64
		for _, g := range batch {
			n += int64(len(g.m.Body))
		}
		d.pending.Add(-n)
		select {
		case d.room <- struct{}{}:
		default:
		}
	}
}

// setBacklog tells Options.Backlog when the drain's state changes.
func (d *drain) setBacklog(b bool) {
	if b != d.backlog && d.p.o.Backlog != nil {
		d.p.o.Backlog(b)
	}
	d.backlog = b
}

// delivered records PUBACKs: the acks are written to the outbox before the
// producers' copies (spool files) are handed to retire, which takes them
// out of the spool. This order is the crash guarantee: a file leaves the
// spool only after its ack is written, so it is never sent again after a
// crash, and never deleted undelivered. A durable record of delivered
// files that lets retirement trail behind in batches belongs here.
func (p *Pipeline) delivered(batch []inflight, retire chan<- []string) {
	seqs := make([]uint64, len(batch))
	var local []string
	for i, f := range batch {
		seqs[i] = f.m.Seq
		if f.m.Local != "" {
			local = append(local, f.m.Local)
		}
	}
	if err := p.outbox.Ack(seqs...); err != nil {
		// Unrecorded acks mean messages sent again later, never lost.
		if p.repeatedNoSpace(p.o.StateDir, err) {
			p.log.Debug("outbox ack", "err", err)
		} else {
			p.log.Error("outbox ack", "err", err)
		}
	}
	if len(local) > 0 {
		retire <- local
	}
	p.ackMu.Lock()
	p.lastAckID, p.lastAckAt = batch[len(batch)-1].m.ID, p.clock.Now().UTC()
	p.ackMu.Unlock()
	p.o.Changed(false)
}
