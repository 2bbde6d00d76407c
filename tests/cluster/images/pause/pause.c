/*
 * The sandbox ("pause") process of every pod in the test cluster.
 *
 * It holds the pod's namespaces open and does nothing else: it sleeps in pause(),
 * exits 0 on SIGINT or SIGTERM (as PID 1 it would otherwise ignore them), and reaps
 * any child reparented to it so that no zombie outlives its process.
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int sig)
{
	(void)sig;
	_exit(0);
}

static void on_child(int sig)
{
	int saved = errno;

	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	errno = saved;
}

int main(int argc, char **argv)
{
	struct sigaction sa;

	if (argc > 1 && strcmp(argv[1], "-v") == 0) {
		static const char version[] = "multisniff pause 1\n";
		return write(STDOUT_FILENO, version, sizeof version - 1) < 0;
	}

	memset(&sa, 0, sizeof sa);
	sigemptyset(&sa.sa_mask);
	sa.sa_handler = on_stop;
	if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0)
		return 1;

	sa.sa_handler = on_child;
	sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
	if (sigaction(SIGCHLD, &sa, NULL) < 0)
		return 1;

	for (;;)
		pause();
}
