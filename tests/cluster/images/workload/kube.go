package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strings"
	"sync"
	"time"
)

const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// podLister lists pods with the pod's own service account, trusting the cluster CA it was given.
type podLister struct {
	api    string
	client *http.Client
	token  string // file; re-read on every request, projected tokens rotate
}

func newPodLister(api string) (*podLister, error) {
	if api == "" {
		return nil, fmt.Errorf("no API server to look pods up: set HOST_IP (downward API status.hostIP), KUBE_API or -api, or give -targets")
	}
	pem, err := os.ReadFile(serviceAccountDir + "/ca.crt")
	if err != nil {
		return nil, fmt.Errorf("reading the cluster CA: %w (is a service account token mounted?)", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s/ca.crt holds no PEM certificate", serviceAccountDir)
	}
	transport := &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout: 5 * time.Second,
		Proxy:               nil,
	}
	return &podLister{
		api:    strings.TrimRight(api, "/"),
		client: &http.Client{Transport: transport, Timeout: 10 * time.Second},
		token:  serviceAccountDir + "/token",
	}, nil
}

type podList struct {
	Items []struct {
		Metadata struct {
			Name              string  `json:"name"`
			DeletionTimestamp *string `json:"deletionTimestamp"`
		} `json:"metadata"`
		Status struct {
			Phase string `json:"phase"`
			PodIP string `json:"podIP"`
		} `json:"status"`
	} `json:"items"`
}

// runningPodIPs returns the IPs of Running, not terminating pods that match selector, sorted.
func (l *podLister) runningPodIPs(ctx context.Context, namespace, selector string) ([]string, error) {
	u := fmt.Sprintf("%s/api/v1/namespaces/%s/pods?labelSelector=%s",
		l.api, url.PathEscape(namespace), url.QueryEscape(selector))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	token, err := os.ReadFile(l.token)
	if err != nil {
		return nil, fmt.Errorf("reading the service account token: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	req.Header.Set("Accept", "application/json")
	resp, err := l.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %s", u, resp.Status, strings.TrimSpace(string(body)))
	}
	return parsePodIPs(body)
}

func parsePodIPs(body []byte) ([]string, error) {
	var list podList
	if err := json.Unmarshal(body, &list); err != nil {
		return nil, fmt.Errorf("the pod list is not JSON: %w", err)
	}
	var ips []string
	for _, p := range list.Items {
		if p.Status.Phase == "Running" && p.Status.PodIP != "" && p.Metadata.DeletionTimestamp == nil {
			ips = append(ips, p.Status.PodIP)
		}
	}
	sort.Strings(ips)
	return ips, nil
}

// targetSet is the current list of peers, either fixed or refreshed from the API.
type targetSet struct {
	mu    sync.Mutex
	addrs []string
	next  int
}

func (t *targetSet) set(addrs []string) (changed bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	changed = strings.Join(addrs, ",") != strings.Join(t.addrs, ",")
	t.addrs = addrs
	return changed
}

// pick returns the next target in round-robin order, or "" while there is none.
func (t *targetSet) pick() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.addrs) == 0 {
		return ""
	}
	a := t.addrs[t.next%len(t.addrs)]
	t.next++
	return a
}

func (t *targetSet) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return "[" + strings.Join(t.addrs, " ") + "]"
}

// resolveTargets fills a targetSet from -targets, or from the API now and every c.refresh.
// withPort turns a pod IP into the address to use. It returns once the first lookup is done.
func resolveTargets(ctx context.Context, c *common, withPort func(ip string) string) (*targetSet, error) {
	ts := &targetSet{}
	if c.targets != "" {
		var addrs []string
		for _, a := range strings.Split(c.targets, ",") {
			if a = strings.TrimSpace(a); a != "" {
				if _, _, err := net.SplitHostPort(a); err != nil {
					a = withPort(a)
				}
				addrs = append(addrs, a)
			}
		}
		ts.set(addrs)
		return ts, nil
	}
	if c.selector == "" {
		return nil, fmt.Errorf("give -targets or -selector")
	}
	lister, err := newPodLister(c.api)
	if err != nil {
		return nil, err
	}
	lookup := func() {
		ips, err := lister.runningPodIPs(ctx, c.ns, c.selector)
		if err != nil {
			if ctx.Err() == nil {
				logf("looking up pods %s in %s: %v", c.selector, c.ns, err)
			}
			return
		}
		addrs := make([]string, len(ips))
		for i, ip := range ips {
			addrs[i] = withPort(ip)
		}
		if ts.set(addrs) {
			logf("targets (%s in %s): %s", c.selector, c.ns, ts)
		}
	}
	lookup()
	go func() {
		tick := time.NewTicker(c.refresh)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				lookup()
			}
		}
	}()
	return ts, nil
}

// waitForTarget blocks until the set has a target or ctx ends.
func waitForTarget(ctx context.Context, ts *targetSet) (string, error) {
	for {
		if a := ts.pick(); a != "" {
			return a, nil
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}
