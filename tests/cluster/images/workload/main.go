// Command workload makes the test cluster's traffic: DNS queries, marked UDP datagrams and
// HTTP requests between pods, each countable in a capture.
//
// Pods in the test cluster have no default route and there is no kube-proxy, so Services do
// not work: a client finds its peers itself, by asking the Kubernetes API at the node's
// address for the pods matching a label selector (or takes explicit addresses).
//
// Every datagram is marked so a capture can be checked exactly: DNS queries ask for
// q-<pod>-<seq>.<zone>, UDP payloads start with "MSNF <pod> <seq>".
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

const usage = `usage: workload COMMAND [flags]

commands:
  dns         send DNS queries (q-<pod>-<seq>.<zone>) to DNS servers, continuously or -count times
  udp         send -count datagrams "MSNF <pod> <seq>" to a target at -rate per second
  udp-listen  receive datagrams and print each marker
  http-serve  serve HTTP
  http        GET a URL, or peers found by label, at -rate per second
  version     print the version

Targets: -targets IP[,IP...] (host:port for udp/http), or -selector LABELS [-namespace NS]
to look up Running pods through the API at https://$HOST_IP:6443 every -refresh.
Run "workload COMMAND -h" for the flags of one command.
`

const version = "multisniff workload 1"

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var err error
	switch cmd, args := os.Args[1], os.Args[2:]; cmd {
	case "dns":
		err = runDNS(ctx, args)
	case "udp":
		err = runUDP(ctx, args)
	case "udp-listen":
		err = runUDPListen(ctx, args)
	case "http-serve":
		err = runHTTPServe(ctx, args)
	case "http":
		err = runHTTP(ctx, args)
	case "version", "-v", "--version":
		fmt.Println(version)
	case "help", "-h", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "workload: no command %q\n\n%s", cmd, usage)
		os.Exit(2)
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(os.Stderr, "workload: %v\n", err)
		var failed *shortfall
		if errors.As(err, &failed) {
			os.Exit(1)
		}
		os.Exit(2)
	}
}

// shortfall is the error of a bounded run in which some requests went unanswered.
type shortfall struct{ what string }

func (s *shortfall) Error() string { return s.what }

// common holds the flags every client command shares.
type common struct {
	pod      string
	rate     float64
	count    int
	targets  string
	selector string
	ns       string
	api      string
	refresh  time.Duration
	timeout  time.Duration
	report   time.Duration
}

func (c *common) register(fs *flag.FlagSet, defaultRate float64) {
	host, _ := os.Hostname()
	fs.StringVar(&c.pod, "pod", envOr("POD_NAME", host), "this pod's name, used in the markers")
	fs.Float64Var(&c.rate, "rate", defaultRate, "messages per second")
	fs.IntVar(&c.count, "count", 0, "send exactly this many, then exit (0: until stopped)")
	fs.StringVar(&c.targets, "targets", "", "explicit targets, comma separated")
	fs.StringVar(&c.selector, "selector", "", "label selector of the target pods")
	fs.StringVar(&c.ns, "namespace", envOr("POD_NAMESPACE", "default"), "namespace of the target pods")
	fs.StringVar(&c.api, "api", defaultAPI(), "Kubernetes API server URL")
	fs.DurationVar(&c.refresh, "refresh", 5*time.Second, "how often to look the target pods up again")
	fs.DurationVar(&c.timeout, "timeout", 2*time.Second, "how long to wait for each answer")
	fs.DurationVar(&c.report, "report", 10*time.Second, "how often to print counters (0: only at the end)")
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func defaultAPI() string {
	if v := os.Getenv("KUBE_API"); v != "" {
		return v
	}
	if ip := os.Getenv("HOST_IP"); ip != "" {
		return "https://" + joinHostPort(ip, "6443")
	}
	return ""
}

func joinHostPort(host, port string) string {
	if strings.Contains(host, ":") {
		return "[" + host + "]:" + port
	}
	return host + ":" + port
}

// pacer releases one tick per 1/rate seconds until count ticks (0: forever) or ctx ends.
func pacer(ctx context.Context, rate float64, count int, each func(seq int)) error {
	if rate <= 0 {
		return fmt.Errorf("-rate must be above 0, not %v", rate)
	}
	interval := time.Duration(float64(time.Second) / rate)
	next := time.Now()
	for seq := 1; count == 0 || seq <= count; seq++ {
		if wait := time.Until(next); wait > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(wait):
			}
		} else if ctx.Err() != nil {
			return ctx.Err()
		}
		each(seq)
		next = next.Add(interval)
	}
	return nil
}

// logf prints one line to stdout with a timestamp; the pods' logs are read by people.
func logf(format string, args ...any) {
	fmt.Printf("%s %s\n", time.Now().UTC().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}
