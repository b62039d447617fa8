// Package keystore defines how gwagent creates and uses device keys that never
// leave the device: a small KeyStore interface returning crypto.Signer values,
// and the key URIs that name a key and the backend holding it.
//
// Backends live in sub-packages (tpm2, pkcs11, softkey); the backends package
// picks one from a URI's scheme. This package imports nothing of gwagent's and
// may be imported by anyone. It never logs.
//
// Every key gwagent creates is ECDSA on NIST P-384 and signs SHA-384 digests
// (the curve Azure's certificate management issues for).
package keystore

import (
	"context"
	"crypto"
)

// KeyStore creates and opens keys in one backend instance: one TPM, one
// PKCS#11 token, or the file system. A KeyStore serializes access to its
// device, so one value may be shared by several goroutines. Two keys may exist
// side by side in one store (renewal holds the current and the next key).
type KeyStore interface {
	// CreateKey generates a new P-384 key at the location u names and returns
	// its signer. It fails with ErrKeyExists if a key is already there.
	CreateKey(ctx context.Context, u *URI) (crypto.Signer, error)
	// Signer opens the existing key u names. It fails with ErrKeyNotFound
	// if there is none.
	Signer(ctx context.Context, u *URI) (crypto.Signer, error)
	// Close releases the backend (TPM connection, PKCS#11 session). Signers
	// obtained from the store must not be used afterwards.
	Close() error
}

// KeyDeleter is implemented by stores that can destroy a key. Deleting a key
// that does not exist returns ErrKeyNotFound.
type KeyDeleter interface {
	DeleteKey(ctx context.Context, u *URI) error
}
