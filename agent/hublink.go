package agent

import (
	"context"
	"sync"

	"github.com/gwagent/gwagent/transport"
)

// hubLink is the agent's side of its hub sessions: the one being served
// (so that a reload, a renewal or the 8883 watch can end it), and the hub's
// callbacks into the agent (direct methods, certificate answers, the 8883
// watch), which run on goroutines the agent does not start: the agent waits
// for those in progress before it closes the key stores, and refuses new
// ones after that.
type hubLink struct {
	ctx context.Context // Run's, for callbacks (nil: RenewOnce, no agent running)

	mu     sync.Mutex
	sess   *transport.Session
	end    func() // ends sess
	closed bool
	wg     sync.WaitGroup
}

// serving records the session being served and how to end it, until the
// returned function is called.
func (h *hubLink) serving(sess *transport.Session, end func()) (done func()) {
	h.mu.Lock()
	h.sess, h.end = sess, end
	h.mu.Unlock()
	return func() {
		h.mu.Lock()
		h.sess, h.end = nil, nil
		h.mu.Unlock()
	}
}

// endSession ends the session being served, if any (the lifecycle then
// connects again: a renewed identity, new network settings).
func (h *hubLink) endSession() { h.endSessionOf(nil) }

// endSessionOf ends sess if it is still the one being served (nil: any).
func (h *hubLink) endSessionOf(sess *transport.Session) {
	h.mu.Lock()
	cur, end := h.sess, h.end
	h.mu.Unlock()
	if end != nil && (sess == nil || sess == cur) {
		end()
	}
}

// enter starts a callback; false means the agent is shutting down and the
// callback must not run.
func (h *hubLink) enter() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return false
	}
	h.wg.Add(1)
	return true
}

func (h *hubLink) leave() { h.wg.Done() }

// closeAndWait refuses new callbacks and waits for those running.
func (h *hubLink) closeAndWait() {
	h.mu.Lock()
	h.closed = true
	h.mu.Unlock()
	h.wg.Wait()
}

// context is the context callbacks work under: the running agent's, so
// that stopping the agent cancels them.
func (h *hubLink) context() context.Context {
	if h.ctx != nil {
		return h.ctx
	}
	return context.Background() // RenewOnce: no running agent
}

// onMethod answers a direct method (agent/twin), as one of the hub's
// callbacks.
func (a *Agent) onMethod(name string, payload []byte) (int, []byte) {
	if !a.hub.enter() {
		return 503, []byte(`{"error":"the agent is stopping"}`)
	}
	defer a.hub.leave()
	return a.twin.OnMethod(name, payload)
}

// onCredentials takes a certificate answer that arrived with nobody waiting
// (the 200 after a reconnect), as one of the hub's callbacks.
func (a *Agent) onCredentials(status int, rid string, body []byte) {
	if !a.hub.enter() {
		return
	}
	defer a.hub.leave()
	a.renewal.OnCredentials(a.hub.context(), status, rid, body)
}
