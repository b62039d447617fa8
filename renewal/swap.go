package renewal

import (
	"context"
	"errors"

	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// swapAttempts is how many times a staged pair is tried when the failures
// say nothing about the pair (hub unreachable) before it is rolled back.
const swapAttempts = 3

// TrySwap connects with a staged identity, if there is one (Deps.Dial). If
// the hub accepts it, it is committed and the previous key deleted, and the
// session is returned. If the hub refuses the new pair, it is rolled back
// (the staged generation and its key are dropped). A failure that says
// nothing about the pair (hub unreachable) keeps it staged for the next
// try. The lifecycle goroutine calls it.
func (r *Renewer) TrySwap(ctx context.Context) (*transport.Session, *provisioning.Identity) {
	store := r.d.Store
	next, err := store.Next()
	if err != nil {
		if !errors.Is(err, provisioning.ErrNotProvisioned) {
			r.log.Warn("unreadable staged identity; dropping it", "err", err)
			store.Discard()
		}
		return nil, nil
	}
	r.d.Status.Swapping()
	sess, err := r.d.Dial(ctx, next)
	if err != nil {
		// A TLS alert about the new certificate is a refusal too, from the
		// second in a row, or once the current pair got through right
		// after it (RejectedThenConnected): a single alert alone may come
		// from a middlebox.
		rejected := tlsconf.RejectedIdentity(err)
		refused := errors.Is(err, transport.ErrUnauthorized) || errors.Is(err, keystore.ErrKeyNotFound) ||
			r.clock.Now().After(next.NotAfter) || (rejected && r.swapRejections >= 1)
		if rejected {
			r.swapRejections++
		} else {
			r.swapRejections = 0
		}
		r.swapFailures++
		if !refused && r.swapFailures < swapAttempts {
			r.log.Warn("could not try the new certificate yet; keeping it staged", "err", err)
			return nil, nil
		}
		r.log.Error("the hub refused the new certificate; rolling back to the current one", "err", err, "serial", next.Serial)
		r.rollback(ctx, next)
		return nil, nil
	}
	r.swapFailures, r.swapRejections = 0, 0
	r.step("swap-connected")
	prev, err := store.Commit()
	if err != nil {
		r.log.Error("could not commit the new identity; staying on it for this session", "err", err)
		return sess, next
	}
	r.step("swap-committed")
	r.d.Status.Clear(CondFailed)
	if prev != nil && prev.KeyURI != next.KeyURI {
		if u, perr := keystore.Parse(prev.KeyURI); perr == nil {
			if derr := r.d.Keys.Delete(ctx, u); derr != nil {
				r.log.Warn("could not delete the previous key", "err", derr)
			}
		}
	}
	r.step("swap-old-key-gone")
	if err := store.Prune(); err != nil {
		r.log.Warn("identity store cleanup", "err", err)
	}
	from := ""
	if prev != nil {
		from = prev.Serial
	}
	r.log.Info("certificate renewed and in use", "serial", next.Serial, "previous_serial", from, "not_after", next.NotAfter, "via", next.Via)
	r.d.Status.InUse(next)
	return sess, next
}

// RejectedThenConnected is called when the hub accepted the current pair:
// if the staged one was just rejected in the TLS handshake, on the same
// path, the alert was about the new certificate, so it is rolled back.
func (r *Renewer) RejectedThenConnected(ctx context.Context) {
	if r.swapRejections == 0 {
		return
	}
	next, err := r.d.Store.Next()
	if err != nil {
		r.swapRejections = 0
		return
	}
	r.log.Error("the hub rejected the new certificate in the TLS handshake and accepted the current one; rolling back", "serial", next.Serial)
	r.rollback(ctx, next)
}

// rollback drops a staged identity and its key (unless it is the current
// key), keeping the current identity.
func (r *Renewer) rollback(ctx context.Context, next *provisioning.Identity) {
	cur, _ := r.d.Store.Current()
	if err := r.d.Store.Discard(); err != nil {
		r.log.Error("rollback", "err", err)
		return
	}
	r.swapFailures, r.swapRejections = 0, 0
	if cur == nil || cur.KeyURI != next.KeyURI {
		if u, err := keystore.Parse(next.KeyURI); err == nil {
			if err := r.d.Keys.Delete(context.WithoutCancel(ctx), u); err != nil {
				r.log.Warn("rollback: could not delete the new key", "err", err)
			}
		}
	}
	if cur != nil {
		r.scheduleRetry(cur, errors.New("the hub refused the renewed certificate"))
	}
}
