package agent

import (
	"context"
	"sync"
)

// callbacks tracks the hub's callbacks into the agent (desired properties,
// direct methods, certificate answers), which run on the MQTT client's
// goroutines: the agent waits for those in progress before it closes the
// key stores, and refuses new ones after that.
type callbacks struct {
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

// enter starts a callback; false means the agent is shutting down and the
// callback must not run.
func (c *callbacks) enter() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.wg.Add(1)
	return true
}

func (c *callbacks) leave() { c.wg.Done() }

// closeAndWait refuses new callbacks and waits for those running.
func (c *callbacks) closeAndWait() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.wg.Wait()
}

// callbackCtx is the context callbacks work under: the running agent's, so
// that stopping the agent cancels them.
func (a *Agent) callbackCtx() context.Context {
	if a.ctx != nil {
		return a.ctx
	}
	return context.Background() // RenewOnce: no running agent
}

// onMethod answers a direct method (agent/twin), as one of the hub's
// callbacks.
func (a *Agent) onMethod(name string, payload []byte) (int, []byte) {
	if !a.calls.enter() {
		return 503, []byte(`{"error":"the agent is stopping"}`)
	}
	defer a.calls.leave()
	return a.twin.OnMethod(name, payload)
}
