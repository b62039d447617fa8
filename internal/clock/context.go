package clock

import (
	"context"
	"errors"
	"time"
)

// WithDeadline is context.WithDeadline on c: the context ends with
// context.DeadlineExceeded once c reads t. For a date the other side
// gave in its time (a certificate request's operationExpires), not for
// bounding I/O: network I/O runs in wall time, and a bound on it is a
// context.WithTimeout or a net.Conn deadline.
//
// On Real it is context.WithDeadline itself (net.Dialer and friends see the
// deadline). On any other clock the context has no Deadline; an AfterFunc
// on c ends it.
func WithDeadline(parent context.Context, c Clock, t time.Time) (context.Context, context.CancelFunc) {
	if _, ok := c.(Real); ok {
		return context.WithDeadline(parent, t)
	}
	ctx, cancel := context.WithCancelCause(parent)
	timer := c.AfterFunc(t.Sub(c.Now()), func() { cancel(context.DeadlineExceeded) })
	return deadlineCtx{ctx}, func() { timer.Stop(); cancel(context.Canceled) }
}

// deadlineCtx reports the end of its clock's deadline as
// context.DeadlineExceeded, as a context.WithDeadline does.
type deadlineCtx struct{ context.Context }

func (d deadlineCtx) Err() error {
	err := d.Context.Err()
	if err != nil && errors.Is(context.Cause(d.Context), context.DeadlineExceeded) {
		return context.DeadlineExceeded
	}
	return err
}
