package agent

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"

	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/backends"
)

// Keys opens each key store once and shares it between the keys that live
// in it (onboarding and operational keys are often in one TPM, and a swtpm
// socket serves one connection at a time). Not safe for concurrent Open;
// the stores themselves serialize device access.
type Keys struct {
	stores map[string]keystore.KeyStore
	log    *slog.Logger // the agent's, or nil (CLI commands)
}

// NewKeys returns an empty set of open key stores.
func NewKeys() *Keys { return &Keys{stores: map[string]keystore.KeyStore{}} }

// agentKeys is the agent's set: it logs what opening a store found.
func agentKeys(log *slog.Logger) *Keys {
	k := NewKeys()
	k.log = log
	return k
}

// staleFlusher is a TPM store that, on a TPM without a resource manager,
// flushed what a killed process had left loaded (tpm2.Store).
type staleFlusher interface{ StaleFlushed() int }

// leakFlusher is a TPM store that flushes what another program leaked into
// a TPM without a resource manager when an operation finds it full.
type leakFlusher interface{ OnLeakFlushed(func(n int)) }

// Store returns the open store for u, opening it on first use.
func (k *Keys) Store(ctx context.Context, u *keystore.URI) (keystore.KeyStore, error) {
	id := u.StoreID()
	if ks, ok := k.stores[id]; ok {
		return ks, nil
	}
	ks, err := backends.Open(ctx, u)
	if err != nil {
		return nil, err
	}
	if f, ok := ks.(staleFlusher); ok && f.StaleFlushed() > 0 && k.log != nil {
		k.log.Warn("flushed transient objects and sessions a killed process left in the TPM (it has no resource manager)", "tpm", id, "count", f.StaleFlushed())
	}
	if f, ok := ks.(leakFlusher); ok && k.log != nil {
		log := k.log
		f.OnLeakFlushed(func(n int) {
			log.Warn("the TPM was full: flushed transient objects and sessions another program left in it (it has no resource manager) and retried", "tpm", id, "count", n)
		})
	}
	k.stores[id] = ks
	return ks, nil
}

// Signer opens the existing key u names.
func (k *Keys) Signer(ctx context.Context, u *keystore.URI) (crypto.Signer, error) {
	ks, err := k.Store(ctx, u)
	if err != nil {
		return nil, err
	}
	return ks.Signer(ctx, u)
}

// Fresh creates a new key at u, destroying a key already there. Callers
// make sure u is not the key of the current identity.
func (k *Keys) Fresh(ctx context.Context, u *keystore.URI) (crypto.Signer, error) {
	ks, err := k.Store(ctx, u)
	if err != nil {
		return nil, err
	}
	s, err := ks.CreateKey(ctx, u)
	if errors.Is(err, keystore.ErrKeyExists) {
		if err := k.Delete(ctx, u); err != nil {
			return nil, fmt.Errorf("replace stale key %s: %w", u, err)
		}
		s, err = ks.CreateKey(ctx, u)
	}
	return s, err
}

// Delete destroys the key u names; a missing key is not an error.
func (k *Keys) Delete(ctx context.Context, u *keystore.URI) error {
	ks, err := k.Store(ctx, u)
	if err != nil {
		return err
	}
	del, ok := ks.(keystore.KeyDeleter)
	if !ok {
		return fmt.Errorf("key store for %s cannot delete keys", u)
	}
	if err := del.DeleteKey(ctx, u); err != nil && !errors.Is(err, keystore.ErrKeyNotFound) {
		return err
	}
	return nil
}

// Close closes every open store.
func (k *Keys) Close() error {
	var errs []error
	for id, ks := range k.stores {
		errs = append(errs, ks.Close())
		delete(k.stores, id)
	}
	return errors.Join(errs...)
}
