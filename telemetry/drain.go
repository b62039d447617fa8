package telemetry

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

// The drain keeps up to drainWindow messages (and drainBytes of bodies)
// waiting for their PUBACK: a sliding window, so a new message goes out as
// soon as the oldest is acknowledged and the drain runs at the broker's
// pace instead of in bursts. The members of a packed message count one
// each: what a SIGKILL may send again is the same with packing or without.
const (
	drainWindow = 256
	drainBytes  = 1 << 20
	// ackBatch is the most messages recorded with one outbox write; it is
	// also the most messages read from the outbox at once, and a full read
	// means a backlog.
	ackBatch = 64
	// maxUrgent bounds the health messages remembered for sending ahead;
	// older ones still go, in queue order.
	maxUrgent = 1024
)

// inflight is one publish waiting for its PUBACK: one message, or the
// members of a packed one.
type inflight struct {
	msgs  []*outbox.Message
	wait  func(context.Context) error
	at    time.Time // when it was published, on the pipeline's clock
	bytes int64     // the members' bodies
}

// sessionFacts is what the drain may learn of the connection besides
// publishing; *transport.Session has it. Done tells a connection the hub
// (or the network) ended from one the agent left; Requests counts what
// was asked of the hub on it (telemetry, twin requests) and what was
// answered (PUBACKs, twin answers).
type sessionFacts interface {
	Done() <-chan struct{}
	Requests() (sent, answered int64)
}

// drain is one session's drain. The sender (Drain's goroutine) reads the
// outbox and publishes ahead; the acker takes the PUBACKs in order and
// records them, with receipts for spool files, which it hands to the
// pipeline's retirer (retire.go). After a crash at most the window is
// sent again.
type drain struct {
	p   *Pipeline
	pub Publisher
	// q holds what is in flight, besides the batch the acker is taking.
	q       chan inflight
	room    chan struct{} // the acker freed room in the window
	pending atomic.Int64  // body bytes in flight
	members atomic.Int64  // messages in flight (a packed one counts its members)
	sys     map[string]string
	backlog bool

	start time.Time
	last  uint64          // the sender's position in the outbox
	ahead map[uint64]bool // health messages sent ahead of the queue order (sender's)
	pk    packer          // messages gathered for one packed publish (sender's)
	// probe: the hub was last seen refusing messages, so one message goes
	// first and the rest only after its PUBACK (firstAck).
	probe     bool
	firstAck  chan struct{}
	published atomic.Int64
	acked     atomic.Int64
	lost      atomic.Bool // a PUBACK wait failed: the connection is gone
	slowAt    time.Time   // the last slow PUBACK (acker's; read after it ended)
}

// Drain sends the outbox's messages over pub in order, oldest first
// (health messages ahead of a backlog), and what is queued later as it
// comes, until ctx ends or a PUBACK fails (the connection is gone: what
// was not acknowledged is sent again by the next Drain). Each message is
// acked in the outbox after its PUBACK. Sending follows Options.Sending:
// the send budget and packing. One Drain at a time.
func (p *Pipeline) Drain(ctx context.Context, pub Publisher) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	d := &drain{p: p, pub: pub, q: make(chan inflight, drainWindow-ackBatch), room: make(chan struct{}, 1),
		sys: make(map[string]string, 4), start: p.clock.Now(), ahead: map[uint64]bool{}, probe: p.quota.suspected(),
		firstAck: make(chan struct{})}
	acker := make(chan struct{})
	go func() {
		defer close(acker)
		defer cancel() // a failed PUBACK ends the sender too
		d.ack(ctx)
	}()
	if f, ok := pub.(sessionFacts); ok {
		// A paced drain may have nothing in flight when the connection
		// ends: it must not wait for its next token to find out.
		go func() {
			select {
			case <-f.Done():
				cancel()
			case <-ctx.Done():
			}
		}()
	}
	defer func() { close(d.q); <-acker; d.ended() }()
	defer d.setBacklog(false)
	if d.probe {
		p.log.Info("the hub was refusing messages: one message first, the rest once it is acknowledged")
	}
	d.send(ctx)
}

// send reads the outbox in order and publishes, waiting whenever the outbox
// is empty, until ctx ends.
func (d *drain) send(ctx context.Context) {
	for ctx.Err() == nil {
		set := d.p.o.Sending()
		if m := d.nextUrgent(); m != nil {
			if !d.publish(ctx, []*outbox.Message{m}) {
				return
			}
			continue
		}
		msgs, err := d.p.outbox.Next(d.last, ackBatch)
		if err != nil {
			d.p.log.Error("outbox read", "err", err)
			return
		}
		if len(msgs) == ackBatch {
			d.setBacklog(true)
		}
		if len(msgs) == 0 {
			if !d.idle(ctx, set) {
				return
			}
			continue
		}
		for _, m := range msgs {
			d.last = m.Seq
			if d.ahead[m.Seq] {
				delete(d.ahead, m.Seq) // sent already, ahead of its turn
				continue
			}
			if !d.take(ctx, m, set) {
				return
			}
		}
	}
}

// idle is the sender with nothing more in the outbox: a pack that is not
// full waits up to PackWait for more members, then goes; otherwise it
// waits for the outbox. false once ctx has ended.
func (d *drain) idle(ctx context.Context, set Sending) bool {
	if len(d.pk.msgs) > 0 {
		wait := set.PackWait - clock.Since(d.p.clock, d.pk.firstAt)
		if !set.Pack || wait <= 0 {
			return d.flush(ctx)
		}
		t, tc := d.p.clock.NewTimer(wait)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return false
		case <-d.p.kick:
		case <-tc:
		}
		return true
	}
	d.setBacklog(false)
	d.p.o.Changed(false)
	if d.probe && d.published.Load() == 0 {
		d.p.quota.release() // nothing to probe with: see quotaWatch.release
	}
	select {
	case <-ctx.Done():
		return false
	case <-d.p.kick:
	}
	return true
}

// take gives m to the pack being gathered, or publishes it alone (after
// the pack, so the order holds). false once ctx has ended.
func (d *drain) take(ctx context.Context, m *outbox.Message, set Sending) bool {
	if set.Pack && packable(m) {
		d.pk.limit = set.PackBytes
		if d.pk.limit <= 0 {
			d.pk.limit = DefaultPackBytes
		}
		if len(d.pk.msgs) > 0 && !d.pk.fits(m) && !d.flush(ctx) {
			return false
		}
		if d.pk.fits(m) {
			d.pk.add(m, d.p.clock.Now())
			return true
		}
		// Larger than a pack on its own: it travels alone, never split.
	}
	return d.flush(ctx) && d.publish(ctx, []*outbox.Message{m})
}

// flush publishes the gathered pack, if any.
func (d *drain) flush(ctx context.Context) bool {
	if len(d.pk.msgs) == 0 {
		return true
	}
	return d.publish(ctx, d.pk.take())
}

// nextUrgent returns the oldest health message queued after the sender's
// position that was not sent ahead yet, so that a backlog does not hold
// back the gateway's health; nil if there is none.
func (d *drain) nextUrgent() *outbox.Message {
	p := d.p
	p.urgentMu.Lock()
	var seq uint64
	for _, s := range p.urgent {
		if s > d.last && !d.ahead[s] {
			seq = s
			break
		}
	}
	p.urgentMu.Unlock()
	if seq == 0 {
		return nil
	}
	ms, err := p.outbox.Next(seq-1, 1)
	if err != nil || len(ms) == 0 || ms[0].Seq != seq {
		p.dropUrgent(seq) // evicted from a full outbox, or acknowledged
		return nil
	}
	d.ahead[seq] = true
	return ms[0]
}

// noteUrgent remembers the health messages among msgs (just queued).
func (p *Pipeline) noteUrgent(msgs []*outbox.Message) {
	p.urgentMu.Lock()
	defer p.urgentMu.Unlock()
	for _, m := range msgs {
		if m.Kind == outbox.KindHealth {
			p.urgent = append(p.urgent, m.Seq)
		}
	}
	if n := len(p.urgent) - maxUrgent; n > 0 {
		p.urgent = append(p.urgent[:0], p.urgent[n:]...)
	}
}

func (p *Pipeline) dropUrgent(seqs ...uint64) {
	p.urgentMu.Lock()
	defer p.urgentMu.Unlock()
	for _, seq := range seqs {
		for i, s := range p.urgent {
			if s == seq {
				p.urgent = append(p.urgent[:i], p.urgent[i+1:]...)
				break
			}
		}
	}
}

// publish is where messages leave the pipeline: it waits for room in the
// window and for a token of the send budget, starts the publish (one
// message, or a packed one) and hands it to the acker. In a probe session
// it then waits for the first PUBACK. It returns false once ctx has ended.
func (d *drain) publish(ctx context.Context, msgs []*outbox.Message) bool {
	var n int64
	for _, m := range msgs {
		n += int64(len(m.Body))
	}
	for d.members.Load() > 0 && (d.pending.Load()+n > drainBytes || d.members.Load()+int64(len(msgs)) > drainWindow) {
		select {
		case <-d.room:
		case <-ctx.Done():
			return false
		}
	}
	budget := func() float64 { return d.p.o.Sending().MaxRate }
	if !d.p.pace.take(ctx, budget) {
		return false
	}
	// A health message queued while this one waited for its token goes
	// first, with that token: a backlog must not hold back the gateway's
	// health.
	for msgs[0].Kind != outbox.KindHealth {
		u := d.nextUrgent()
		if u == nil {
			break
		}
		if !d.launch(ctx, []*outbox.Message{u}, int64(len(u.Body))) || !d.p.pace.take(ctx, budget) {
			return false
		}
	}
	return d.launch(ctx, msgs, n)
}

// launch starts one publish that has its token and room in the window,
// and hands it to the acker; in a probe session the first one then waits
// for its PUBACK. false once ctx has ended.
func (d *drain) launch(ctx context.Context, msgs []*outbox.Message, n int64) bool {
	var body []byte
	var system, app map[string]string
	if len(msgs) == 1 {
		m := msgs[0]
		clear(d.sys)
		for k, v := range m.System {
			d.sys[k] = v
		}
		d.sys["mid"] = m.ID
		body, system, app = m.Body, d.sys, m.App
	} else {
		body, system, app = packed(msgs)
	}
	d.pending.Add(n)
	d.members.Add(int64(len(msgs)))
	f := inflight{msgs: msgs, wait: d.pub.PublishTelemetry(body, system, app), at: d.p.clock.Now(), bytes: n}
	first := d.published.Add(1) == 1
	select {
	case d.q <- f:
	case <-ctx.Done():
		return false
	}
	if d.probe && first {
		select {
		case <-d.firstAck:
		case <-ctx.Done():
			return false
		}
	}
	return true
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
			if ctx.Err() == nil {
				d.lost.Store(true)
			}
			return // sent again from the outbox on the next connection
		}
		// Take the PUBACKs already in with it: one ack write for up to
		// ackBatch messages.
		batch = append(batch[:0], f)
		members := len(f.msgs)
	more:
		for members < ackBatch {
			select {
			case g, ok := <-d.q:
				if !ok {
					break more
				}
				if members+len(g.msgs) > ackBatch || g.wait(polled) != nil {
					held = &g
					break more
				}
				batch = append(batch, g)
				members += len(g.msgs)
			default:
				break more
			}
		}
		d.noteAcked(batch)
		d.p.delivered(batch, d.members.Load() > int64(members))
		var n int64
		for _, g := range batch {
			n += g.bytes
		}
		d.pending.Add(-n)
		d.members.Add(-int64(members))
		select {
		case d.room <- struct{}{}:
		default:
		}
	}
}

// noteAcked tells the quota watch and the pacer about a batch of PUBACKs:
// the first of a session clears a refusal, and their latency says whether
// the hub is holding messages.
func (d *drain) noteAcked(batch []inflight) {
	p := d.p
	now := p.clock.Now()
	if d.acked.Add(int64(len(batch))) == int64(len(batch)) {
		close(d.firstAck)
		if p.quota.took() {
			p.sink.Clear(CondHubQuota)
			p.log.Info("the hub acknowledges messages again")
		}
	}
	lat := now.Sub(batch[0].at) // the oldest of the batch waited longest
	slow, ev := p.pace.acked(now, lat)
	if slow {
		d.slowAt = now
	}
	switch ev {
	case paceCut:
		p.sink.Raise(CondSendSlowed, "the hub is holding messages (PUBACKs come late: traffic shaping, the step before throttling); "+p.pace.describe())
		rate, _ := p.pace.current()
		p.log.Info("the hub is holding messages; sending slower", "puback_after", lat.Round(time.Millisecond), "rate", rate)
	case paceFull:
		p.sink.Clear(CondSendSlowed)
	}
}

// ended judges the session once the drain is over: a connection the hub
// closed with nothing answered is a refusal (quota.go); one it closed
// after slowing PUBACKs is throttling (pacer.go).
func (d *drain) ended() {
	p := d.p
	lost := d.lost.Load()
	sent, answered := d.published.Load(), d.acked.Load()
	if f, ok := d.pub.(sessionFacts); ok {
		select {
		case <-f.Done():
			lost = true
		default:
		}
		sent, answered = f.Requests()
	}
	if !lost {
		return
	}
	now := p.clock.Now()
	switch {
	case sent > 0 && answered == 0 && p.pace.slowWithin(now, slowRecently) && p.quota.refusedAfterSlow():
		if p.pace.throttled(now) {
			p.sink.Raise(CondSendSlowed, "the hub closed the connection at the first message, right after slowing PUBACKs (throttling, 429002 on the hub's side); "+p.pace.describe())
		}
		p.log.Warn("the hub refused the first message right after slowing PUBACKs (throttling); reconnecting, sending slower")
	case sent > 0 && answered == 0:
		what := "the hub closed the connection right after the first telemetry message, without a PUBACK"
		if d.published.Load() == 0 {
			what = "the hub closed the connection right after a twin request, without an answer"
		}
		st, hold := p.quota.refused(d.start, now, what)
		if !hold {
			p.log.Warn("the hub closed the connection before answering anything, as it does over its daily quota (or the link failed); "+
				"the next connection sends one message first to tell", "seen", what)
			break
		}
		depth, _ := p.outbox.Depth()
		p.sink.Raise(CondHubQuota, st.reason(depth))
		p.log.Warn("the hub refuses messages as it does over its daily quota; holding connections back", "seen", what,
			"refusals", st.Refusals, "next_probe", st.NextProbe.UTC())
	case d.acked.Load() > 0 && !d.slowAt.IsZero():
		if p.pace.throttled(now) {
			p.sink.Raise(CondSendSlowed, "the hub closed the connection after slowing PUBACKs (throttling, 429002 on the hub's side); "+p.pace.describe())
			rate, _ := p.pace.current()
			p.log.Warn("the hub closed the connection after slowing PUBACKs (throttling); sending slower", "rate", rate)
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

// delivered records PUBACKs: the acks, and receipts for the spool files
// (the producers' copies) of those messages, are written to the outbox
// before the files are handed to the retirer, which takes them out of the
// spool. This order is the crash guarantee: a file leaves the spool only
// after its PUBACK is recorded, so it is never deleted undelivered (for a
// packed message, only after the PUBACK of the message that carried it),
// and once its receipt is written it is never sent again. The receipt of
// a lone file, with nothing else in flight and the retirer not behind, is
// held in memory: the retirer removes it at once (retire.go).
func (p *Pipeline) delivered(batch []inflight, more bool) {
	var seqs, health []uint64
	var files []outbox.Receipt
	var lastID string
	for _, f := range batch {
		for _, m := range f.msgs {
			seqs = append(seqs, m.Seq)
			if m.Local != "" {
				files = append(files, outbox.Receipt{Path: m.Local, ID: m.LocalID})
			}
			if m.Kind == outbox.KindHealth {
				health = append(health, m.Seq)
			}
			lastID = m.ID
		}
	}
	hold := len(files) == 1 && !more && !p.retire.behind(0)
	files, err := p.outbox.Deliver(seqs, files, hold)
	if err != nil {
		// Unrecorded acks mean messages sent again later, never lost.
		if p.repeatedNoSpace(p.o.StateDir, err) {
			p.log.Debug("outbox ack", "err", err)
		} else {
			p.log.Error("outbox ack", "err", err)
		}
	}
	if len(health) > 0 {
		p.dropUrgent(health...)
	}
	p.retire.add(files)
	p.ackMu.Lock()
	p.lastAckID, p.lastAckAt = lastID, p.clock.Now().UTC()
	p.ackMu.Unlock()
	p.o.Changed(false)
}
