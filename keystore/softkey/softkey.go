// Package softkey is the software key store: ECDSA P-384 private keys in PEM
// files (PKCS#8; SEC 1 files are read too), for gateways with neither a TPM
// nor a PKCS#11 token. The key is as safe as the file system: files are
// created 0600 with an atomic create-only write, and a key file readable by
// group or others is refused.
//
// Importers: keystore/backends and tests.
package softkey

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/keystore"
)

// Store is the file-backed key store. It holds no resources.
type Store struct{}

// New returns the file-backed key store.
func New() *Store { return &Store{} }

var (
	_ keystore.KeyStore   = (*Store)(nil)
	_ keystore.KeyDeleter = (*Store)(nil)
)

func path(u *keystore.URI) (string, error) {
	if u.Scheme != keystore.SchemeFile || u.Path == "" {
		return "", fmt.Errorf("softkey: %w: %s is not a file: key URI", keystore.ErrBadURI, u)
	}
	return u.Path, nil
}

// CreateKey generates a P-384 key and writes it to u's path, creating the
// parent directory (0700) if needed.
func (*Store) CreateKey(ctx context.Context, u *keystore.URI) (crypto.Signer, error) {
	p, err := path(u)
	if err != nil {
		return nil, err
	}
	if _, err := os.Lstat(p); err == nil {
		return nil, fmt.Errorf("softkey create: %w at %s", keystore.ErrKeyExists, p)
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return nil, fmt.Errorf("softkey create: %w; check that the directory is writable by this user", err)
	}
	k, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("softkey create: %w", err)
	}
	der, err := marshalPKCS8(k)
	if err != nil {
		return nil, fmt.Errorf("softkey create: %w", err)
	}
	data := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	if err := atomicfile.Create(p, data, 0o600); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("softkey create: %w at %s", keystore.ErrKeyExists, p)
		}
		return nil, fmt.Errorf("softkey create: %w", err)
	}
	return &signer{key: k}, nil
}

// Signer loads the key at u's path. The file must not be readable or
// writable by group or others.
func (*Store) Signer(ctx context.Context, u *keystore.URI) (crypto.Signer, error) {
	p, err := path(u)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("softkey open: %w: no key file at %s; create one with `gwagent keygen --key %s`", keystore.ErrKeyNotFound, p, u)
	}
	if err != nil {
		return nil, fmt.Errorf("softkey open: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("softkey open: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("softkey open: %s is not a regular file", p)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("softkey open: %w: %s has mode %04o; run `chmod 600 %s` (and check who could have read it)",
			keystore.ErrInsecureKeyFile, p, st.Mode().Perm(), p)
	}
	data, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("softkey open: %w", err)
	}
	k, err := parse(data)
	if err != nil {
		return nil, fmt.Errorf("softkey open %s: %w", p, err)
	}
	return &signer{key: k}, nil
}

func parse(data []byte) (*ecdsa.PrivateKey, error) {
	block, rest := pem.Decode(data)
	if block != nil && block.Type == "EC PARAMETERS" { // openssl ecparam -genkey writes the curve first
		block, _ = pem.Decode(rest)
	}
	if block == nil {
		return nil, errors.New("no PEM block found; the file is not a gwagent key")
	}
	var k *ecdsa.PrivateKey
	var err error
	switch block.Type {
	case "PRIVATE KEY":
		k, err = parsePKCS8(block.Bytes)
	case "EC PRIVATE KEY":
		k, err = parseSEC1(block.Bytes, nil)
	default:
		return nil, fmt.Errorf("PEM block %q is not a private key; gwagent keys are ECDSA P-384, create one with gwagent keygen", block.Type)
	}
	if errors.Is(err, keystore.ErrUnsupportedCurve) {
		return nil, fmt.Errorf("%w; create a new key with gwagent keygen", err)
	}
	if err != nil {
		return nil, fmt.Errorf("cannot parse private key: %w", err)
	}
	return k, nil
}

// DeleteKey removes the key file.
func (*Store) DeleteKey(ctx context.Context, u *keystore.URI) error {
	p, err := path(u)
	if err != nil {
		return err
	}
	if err := atomicfile.Remove(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("softkey delete: %w at %s", keystore.ErrKeyNotFound, p)
		}
		return fmt.Errorf("softkey delete: %w", err)
	}
	return nil
}

// Close does nothing: the store holds no resources.
func (*Store) Close() error { return nil }

type signer struct{ key *ecdsa.PrivateKey }

func (s *signer) Public() crypto.PublicKey { return &s.key.PublicKey }

func (s *signer) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := keystore.CheckDigest(digest, opts); err != nil {
		return nil, fmt.Errorf("softkey sign: %w", err)
	}
	return ecdsa.SignASN1(r, s.key, digest)
}
